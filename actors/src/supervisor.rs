//! The supervisor: parent of every batcher actor. Batchers are spawned linked to it, so a
//! batcher that fails (a bug in scheduling code: engine panics are caught on the engine
//! thread) is reported here and marked down instead of taking the server with it.

use std::collections::BTreeMap;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::batcher::FailureHook;

/// The state of one supervised batcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatcherHealth {
    Running,
    Failed(String),
    Stopped,
}

pub enum SupervisorMsg {
    /// A batcher was spawned linked to the supervisor.
    Register { model: String, cell: ActorCell, on_failure: Option<FailureHook> },
    /// Health of every batcher, by model.
    Health(RpcReplyPort<BTreeMap<String, BatcherHealth>>),
}

pub struct Supervisor;

struct Supervised {
    cell: Option<ActorCell>,
    health: BatcherHealth,
    on_failure: Option<FailureHook>,
    failures: u64,
}

#[derive(Default)]
pub struct SupervisorState {
    models: BTreeMap<String, Supervised>,
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
            SupervisorMsg::Register { model, cell, on_failure } => {
                let failures = st.models.get(&model).map_or(0, |s| s.failures);
                st.models.insert(
                    model,
                    Supervised { cell: Some(cell), health: BatcherHealth::Running, on_failure, failures },
                );
            }
            SupervisorMsg::Health(reply) => {
                let _ = reply.send(st.models.iter().map(|(m, s)| (m.clone(), s.health.clone())).collect());
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
            if entry.cell.as_ref().is_some_and(|c| c.get_id() == cell.get_id()) {
                entry.cell = None;
                entry.health = health.clone();
                if let BatcherHealth::Failed(err) = &health {
                    entry.failures += 1;
                    tracing::warn!(model = %model, failures = entry.failures, error = %err, "batcher down; restarting it");
                    // The owner reloads the model (a new batcher registers itself again).
                    if let Some(hook) = &entry.on_failure {
                        hook(err.clone());
                    }
                } else {
                    tracing::info!(model = %model, "batcher stopped");
                }
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

    pub(crate) fn register(&self, model: &str, cell: ActorCell, on_failure: Option<FailureHook>) {
        let _ = self.actor.cast(SupervisorMsg::Register { model: model.to_string(), cell, on_failure });
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
