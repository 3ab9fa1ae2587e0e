//! What agents spend through the LLM gateway, added to their records.

use crate::spend::Usage;

use super::SupervisorTask;

impl SupervisorTask {
    /// One request's usage, as the gateway read it: added to the agent's spend (in total
    /// and for the model) and stored.
    pub(super) fn spent(&mut self, agent_id: &str, model: &str, usage: &Usage) {
        let Some(machine) = self.table.get_mut(agent_id) else {
            tracing::debug!(%agent_id, "spend of an agent no longer kept");
            return;
        };
        machine.spend_mut().add(model, usage);
        if let Err(error) = self.store.put(machine.record()) {
            tracing::warn!(%agent_id, %error, "storing the agent's spend");
        }
    }
}
