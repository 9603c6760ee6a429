//! Seeds of a simulation run on every core: each seed's run is
//! single-threaded and deterministic on its own (its own runtime with
//! paused time, its state in thread-locals), so the threads share nothing
//! and a seed replays alike however many run beside it.

/// Runs `each` over `seeds`, one thread per core (at most 4), and answers
/// the results in seed order.
pub fn on_every_core<T: Send>(seeds: &[u64], each: impl Fn(u64) -> T + Sync) -> Vec<(u64, T)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4)
        .min(seeds.len().max(1));
    let mut results: Vec<(u64, T)> = std::thread::scope(|scope| {
        let shards: Vec<_> = (0..threads)
            .map(|shard| {
                let each = &each;
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(shard)
                        .step_by(threads)
                        .map(|&seed| (seed, each(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        shards
            .into_iter()
            .flat_map(|shard| shard.join().expect("a shard of seeds panicked"))
            .collect()
    });
    results.sort_by_key(|(seed, _)| *seed);
    results
}
