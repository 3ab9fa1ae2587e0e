//! Spend and budgets between the API and core.

use agentd_core::{Budget, OnLimit, Spend, Usage};
use agentd_proto::v1 as pb;
use tonic::Status;

pub(crate) fn usage(usage: &Usage) -> pb::Usage {
    pb::Usage {
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cached_input_tokens: usage.cached_input_tokens,
        requests: usage.requests,
        cost_micros: usage.cost_micros,
    }
}

pub(super) fn spend(spend: &Spend) -> pb::Spend {
    pb::Spend {
        total: Some(usage(&spend.total)),
        models: spend
            .models
            .iter()
            .map(|(model, spent)| (model.clone(), usage(spent)))
            .collect(),
        reported: (spend.reported.requests > 0).then(|| usage(&spend.reported)),
    }
}

pub(crate) fn usage_request(usage: pb::Usage) -> Usage {
    Usage {
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cached_input_tokens: usage.cached_input_tokens,
        requests: usage.requests,
        cost_micros: usage.cost_micros,
    }
}

pub(crate) fn budget(budget: &Budget) -> pb::Budget {
    pb::Budget {
        tokens: budget.tokens.unwrap_or(0),
        cost_micros: budget.cost_micros.unwrap_or(0),
        requests: budget.requests.unwrap_or(0),
        on_limit: match budget.on_limit {
            OnLimit::Pause => pb::OnLimit::Pause,
            OnLimit::Stop => pb::OnLimit::Stop,
            OnLimit::Reject => pb::OnLimit::Reject,
        } as i32,
    }
}

/// 0 is no limit; an unknown `on_limit` is INVALID_ARGUMENT.
pub(crate) fn budget_request(budget: pb::Budget) -> Result<Budget, Status> {
    let on_limit = match pb::OnLimit::try_from(budget.on_limit) {
        Ok(pb::OnLimit::Unspecified | pb::OnLimit::Pause) => OnLimit::Pause,
        Ok(pb::OnLimit::Stop) => OnLimit::Stop,
        Ok(pb::OnLimit::Reject) => OnLimit::Reject,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "invalid `budget.on_limit`: {} is not an OnLimit (give PAUSE, STOP or REJECT)",
                budget.on_limit
            )));
        }
    };
    let limit = |value: u64| (value > 0).then_some(value);
    Ok(Budget {
        tokens: limit(budget.tokens),
        cost_micros: limit(budget.cost_micros),
        requests: limit(budget.requests),
        on_limit,
    })
}
