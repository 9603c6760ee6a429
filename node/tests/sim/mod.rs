//! A deterministic simulator of the cluster's Raft layer: real openraft and
//! the real redb store (`node::cluster::store`) on each node, all nodes in
//! one process under a seeded, faulty network and paused tokio time.

pub mod client;
pub mod model;
pub mod network;
pub mod node;
pub mod wire;
pub mod world;

use std::cell::Cell;
use std::future::Future;
use std::sync::mpsc;
use std::sync::Once;
use std::time::Duration;

/// Real time one seed may take before it counts as hung. A seed takes well
/// under a second; a synchronous deadlock or a task that spins without
/// letting simulated time pass would otherwise hang the test run.
const SEED_WALL_TIME_MAX: Duration = Duration::from_secs(120);

thread_local! {
    static CURRENT_SEED: Cell<Option<u64>> = const { Cell::new(None) };
    /// Panics in this thread's simulation (tokio keeps a task's panic to its JoinHandle).
    static PANICS: Cell<u64> = const { Cell::new(0) };
}

/// Panics seen in the running simulation (any task: openraft's included).
pub fn panics() -> u64 {
    PANICS.with(Cell::get)
}

/// Makes every panic inside a simulation name its seed and count.
fn install_seed_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(seed) = CURRENT_SEED.with(Cell::get) {
                PANICS.with(|panics| panics.set(panics.get() + 1));
                eprintln!(
                    "cluster_sim: panic in seed={seed} (rerun: BALLAST_SIM_SEED={seed} cargo test -p node --test cluster_sim)"
                );
            }
            default(info);
        }));
        if let Ok(filter) = std::env::var("BALLAST_SIM_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Runs `future` for `seed` on a current-thread runtime with paused time.
pub fn simulate<T>(seed: u64, future: impl Future<Output = T>) -> T {
    install_seed_hook();
    CURRENT_SEED.with(|current| current.set(Some(seed)));
    PANICS.with(|panics| panics.set(0));
    let (done, watched) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(SEED_WALL_TIME_MAX) {
            eprintln!(
                "cluster_sim: seed={seed} still runs after {SEED_WALL_TIME_MAX:?} of real time: hung \
                 (a deadlock, or a task spinning so simulated time cannot pass)"
            );
            std::process::exit(101);
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let output = runtime.block_on(future);
    drop(runtime);
    drop(done);
    watchdog.join().expect("the watchdog ends");
    CURRENT_SEED.with(|current| current.set(None));
    output
}
