//! A loop of memory hits, for counting instructions per hit: `valgrind --tool=callgrind` counts
//! instructions, not seconds, so unlike the timings of `benches/memory_hit.rs` its figures repeat
//! exactly on this noisy machine.
//!
//! ```text
//! cargo build --release --example hit_loop
//! for n in 0 100000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/hits.$n \
//!     target/release/examples/hit_loop chain $n 2>&1 | grep Collected
//! done   # (second total - first) / 100000 = instructions per hit
//! ```
//!
//! Modes: `chain` (`TieredCache::get`, memory over an in-process source), `userconfig`
//! (`UserConfigStorage::get_user_config` over the same), `quick_cache` (a raw
//! `quick_cache::sync::Cache::get`). 500 keys (`user-00000042`), visited in a fixed shuffled
//! order, every lookup a hit; the set-up is the same whatever the count, so it cancels out.

use std::hint::black_box;
use std::sync::Arc;

use tiercache_core::TieredCache;
use tiercache_memory::MemoryTier;
use tiercache_testkit::FakeSource;

const KEYS: usize = 500;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(count)) = (args.next(), args.next()) else {
        eprintln!("usage: hit_loop <chain|userconfig|quick_cache> <hits>");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("a number of hits");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut keys: Vec<String> = (0..KEYS).map(|i| format!("user-{i:08}")).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut keys);

    let source = FakeSource::<String, String>::new("db");
    let configs = FakeSource::<String, userconfig::UserConfig>::new("db");
    for k in &keys {
        source.put(k.clone(), "{\"theme\":\"dark\"}".to_owned());
        configs.put(k.clone(), userconfig::UserConfig::default_for(k.as_str()));
    }
    let memory = MemoryTier::<String, String>::builder()
        .capacity(2 * KEYS)
        .build()
        .expect("a memory tier");
    let chain = TieredCache::builder()
        .tier(memory)
        .source(source)
        .build()
        .expect("a chain");
    let storage = rt
        .block_on(
            userconfig::UserConfigStorage::builder()
                .memory_capacity(2 * KEYS)
                .source(Arc::new(configs))
                .build(),
        )
        .expect("a storage");
    let quick = quick_cache::sync::Cache::<String, Arc<String>>::new(2 * KEYS);
    rt.block_on(async {
        for k in &keys {
            chain.get(k).await.expect("loaded");
            storage.get_user_config(k).await.expect("loaded");
            quick.insert(k.clone(), Arc::new("{\"theme\":\"dark\"}".to_owned()));
        }
    });

    rt.block_on(async {
        let key = |i: usize| &keys[i % KEYS];
        match mode.as_str() {
            "chain" => {
                for i in 0..count {
                    black_box(chain.get(key(i)).await.expect("a hit"));
                }
            }
            "userconfig" => {
                for i in 0..count {
                    black_box(storage.get_user_config(key(i)).await.expect("a hit"));
                }
            }
            "quick_cache" => {
                for i in 0..count {
                    black_box(quick.get(key(i)));
                }
            }
            other => {
                eprintln!("unknown mode {other}");
                std::process::exit(2);
            }
        }
    });
}
