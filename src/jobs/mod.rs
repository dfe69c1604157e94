//! Background workers. Each runs until the shared shutdown token is
//! cancelled and finishes the unit of work it is in before stopping.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;

pub mod inbox;
pub mod retention;

/// The running workers, to be awaited at shutdown.
pub struct Workers {
    tasks: JoinSet<()>,
}

impl Workers {
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

pub fn spawn_all(state: &AppState, shutdown: CancellationToken) -> Workers {
    let mut tasks = JoinSet::new();
    tasks.spawn(retention::run(state.clone(), shutdown.clone(), Duration::from_secs(3600)));
    if let Some(emulator) = &state.emulator {
        tasks.spawn(crate::providers::stripe_emulator::delivery::run(emulator.clone(), shutdown));
    }
    Workers { tasks }
}
