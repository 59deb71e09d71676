//! `userconfig simulate`: several service instances in one process, sharing Redis and the
//! database, under a Zipf-popular read/write workload; what each tier answered, how fast, how
//! many database queries the cache saved, and how long other instances served a replaced
//! version (staleness).
//!
//! `--compare` runs the same workload twice: as the seed design had it (no single-flight, no
//! cross-instance invalidation) and as tiercache does, and `--out DIR` writes both results as
//! JSON and draws the report's charts as SVG.
//!
//! | file | job |
//! |---|---|
//! | `args.rs` | the options and their checks |
//! | `workload.rs` | who asks, how often, and the latencies kept |
//! | `stale.rs` | the staleness tracker: which read returned less than a finished update |
//! | `run.rs` | one run: the instances, storing the users, the workers, merging and summing up |
//! | `result.rs` | what a run measured, as JSON |
//! | `report.rs` | the text report, the comparison, and the files of `--out` |
//! | `plot.rs` | the SVG charts of `--out` |

/// `println!`, or `eprintln!` when standard output carries the JSON result.
macro_rules! say {
    ($stderr:expr) => {
        if $stderr { eprintln!() } else { println!() }
    };
    ($stderr:expr, $($arg:tt)*) => {
        if $stderr { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

mod args;
mod plot;
mod report;
mod result;
mod run;
mod stale;
mod workload;

pub(crate) use args::SimulateArgs;
pub(crate) use run::run;
