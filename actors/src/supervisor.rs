//! The supervisor: parent of every batcher actor. Batchers are spawned linked to it, so a
//! batcher that fails (a bug in scheduling code: engine panics are caught on the engine
//! thread) is reported here and marked down instead of taking the server with it.

use std::collections::BTreeMap;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

/// The state of one supervised batcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatcherHealth {
    Running,
    Failed(String),
    Stopped,
}

pub enum SupervisorMsg {
    /// A batcher was spawned linked to the supervisor.
    Register { model: String, cell: ActorCell },
    /// Health of every batcher, by model.
    Health(RpcReplyPort<BTreeMap<String, BatcherHealth>>),
}

pub struct Supervisor;

#[derive(Default)]
pub struct SupervisorState {
    models: BTreeMap<String, (Option<ActorCell>, BatcherHealth)>,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<SupervisorMsg>, _: ()) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState::default())
    }

    async fn handle(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Register { model, cell } => {
                st.models.insert(model, (Some(cell), BatcherHealth::Running));
            }
            SupervisorMsg::Health(reply) => {
                let _ = reply.send(st.models.iter().map(|(m, (_, h))| (m.clone(), h.clone())).collect());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, health) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::error!(actor = ?cell.get_id(), error = %err, "batcher failed");
                (cell, BatcherHealth::Failed(err.to_string()))
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, BatcherHealth::Stopped),
            _ => return Ok(()),
        };
        for (model, entry) in st.models.iter_mut() {
            if entry.0.as_ref().is_some_and(|c| c.get_id() == cell.get_id()) {
                tracing::warn!(model = %model, health = ?health, "batcher down");
                *entry = (None, health.clone());
            }
        }
        Ok(())
    }
}

/// A handle to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
}

impl SupervisorHandle {
    pub async fn start() -> Result<Self, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(None, Supervisor, ()).await?;
        Ok(SupervisorHandle { actor })
    }

    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    pub(crate) fn register(&self, model: &str, cell: ActorCell) {
        let _ = self.actor.cast(SupervisorMsg::Register { model: model.to_string(), cell });
    }

    /// Health of every batcher, by model.
    pub async fn health(&self) -> BTreeMap<String, BatcherHealth> {
        match self.actor.call(SupervisorMsg::Health, None).await {
            Ok(ractor::rpc::CallResult::Success(h)) => h,
            _ => BTreeMap::new(),
        }
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
