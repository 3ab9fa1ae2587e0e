//! Events as the API sends them: whole, or with only the figures of the status
//! (`EVENT_VIEW_FIGURES`, [`agentd_proto::figures`]).

use agentd_core::{Alert, Event};
use agentd_proto::v1 as pb;

use super::{Mirror, status, timestamp};

pub fn event(event: &Event) -> pb::AgentEvent {
    pb::AgentEvent {
        status: Some(status(&event.status)),
        ..without_status(event)
    }
}

/// The event with only the figures of its status.
pub fn event_figures(event: &Event) -> pb::AgentEvent {
    pb::AgentEvent {
        status: Some(status(&event.status).figures()),
        ..without_status(event)
    }
}

fn without_status(event: &Event) -> pb::AgentEvent {
    pb::AgentEvent {
        sequence: event.sequence,
        time: Some(timestamp(event.time)),
        agent_id: event.status.agent_id().to_string(),
        kind: event.kind.to_wire().into(),
        status: None,
        message: event.message.clone(),
        alert: event.alert.as_ref().map(alert),
        denied: event.denied.as_ref().map(|denied| pb::DeniedConnection {
            host: denied.host.clone(),
            port: denied.port.into(),
            reason: denied.reason.clone(),
        }),
    }
}

fn alert(alert: &Alert) -> pb::Alert {
    pb::Alert {
        metric: alert.metric.to_wire().into(),
        value: alert.value,
        threshold: alert.threshold,
        action: alert.action.to_wire().into(),
    }
}
