//! The chain on the embedded default: the memory tier over an in-process source that takes a
//! millisecond per call, under a skewed read/write workload from several tasks.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! Prints what each tier answered, how many source loads the cache saved, and the stats JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_core::{Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, Fault, Op};

const USERS: u64 = 2_000;
const TASKS: usize = 4;
const OPS_PER_TASK: usize = 5_000;
const WRITE_EVERY: usize = 50; // 2% writes

/// A user id drawn with Zipf-like popularity (exponent 1): user `k` about `1/k` as often as
/// user 1.
fn popular_user(rng: &mut fastrand::Rng) -> u64 {
    let ln_n = (USERS as f64).ln();
    let k = (rng.f64() * ln_n).exp() as u64;
    k.clamp(1, USERS)
}

#[tokio::main]
async fn main() -> tiercache_core::Result<()> {
    let memory = Arc::new(MemoryTier::<u64, String>::new());
    let source = FakeSource::<u64, String>::new("database");
    // The in-process "database" answers reads and writes after a millisecond, like a nearby
    // PostgreSQL.
    source
        .faults()
        .set_for(Op::Get, Fault::Delay(Duration::from_millis(1)));
    source
        .faults()
        .set_for(Op::Write, Fault::Delay(Duration::from_millis(1)));
    for user in 1..=USERS {
        source.put(user, format!("{{\"theme\":\"dark\",\"user\":{user}}}"));
    }

    let cache = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .source(source.clone())
        .build()?;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(task as u64);
            let mut from_memory = 0u64;
            for op in 0..OPS_PER_TASK {
                let user = popular_user(&mut rng);
                if op % WRITE_EVERY == 0 {
                    let config = format!("{{\"theme\":\"light\",\"user\":{user},\"op\":{op}}}");
                    cache.update(&user, Arc::new(config)).await?;
                } else if cache.fetch(&user).await?.origin == Origin::Tier(0) {
                    from_memory += 1;
                }
            }
            Ok::<u64, tiercache_core::Error>(from_memory)
        }));
    }
    let mut from_memory = 0;
    for task in tasks {
        from_memory += task.await.expect("task panicked")?;
    }
    let elapsed = started.elapsed();

    let stats = cache.stats();
    let reads = stats.requests;
    let loads = source.calls().get;
    println!(
        "{} operations from {TASKS} tasks in {elapsed:.2?} ({reads} reads, {} writes)",
        TASKS * OPS_PER_TASK,
        stats.updates
    );
    println!(
        "memory answered {from_memory} reads ({:.1}%); the source was read {loads} times, \
         {} fewer than without a cache",
        100.0 * from_memory as f64 / reads.max(1) as f64,
        reads.saturating_sub(loads),
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&stats).expect("stats serialize")
    );
    Ok(())
}
