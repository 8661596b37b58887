//! The scenarios, each in its own module, run in this order when selected.

mod failover;
mod fencing;
mod grant;
mod handoff;
mod idle;
mod neighbours;
mod node;
mod peer;
mod scale;

use crate::measure::Report;
use crate::Bench;

/// Runs the scenarios `--only` selects (all by default).
pub async fn run_selected(b: &Bench, r: &mut Report) {
    let on = |n: u8| b.args.only.contains(&n);
    if on(1) {
        grant::run(b, r).await;
    }
    if on(2) || on(3) {
        // The client-go peer's rows go into both tables: SIGTERM handovers beside the
        // handoffs, SIGKILL failovers beside the failovers.
        let handoffs = handoff::measure(b).await;
        let failovers = failover::measure(b).await;
        let peer = peer::measure(b).await;
        handoff::report(r, &handoffs, &peer);
        failover::report(r, &failovers, &peer);
    }
    if on(4) {
        scale::run(b, r).await;
    }
    if on(5) {
        idle::run(b, r).await;
    }
    if on(6) {
        neighbours::run(b, r).await;
    }
    if on(7) {
        fencing::run(b, r).await;
    }
    if on(8) {
        node::pods(b, r).await;
    }
    if on(9) {
        node::routes(b, r).await;
    }
}
