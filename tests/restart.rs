//! A worker's restart on its own state directory: the items it held are taken back where they
//! were, their leases kept.

mod common;

use common::worker::*;
use common::*;
use std::time::Duration;

use stockade::control_plane::local::{Fault, FaultKind};
use stockade::control_plane::wire::WorkState;

/// A worker told to stop while a heartbeat is on its way: the beat is let finish and its answer
/// recorded, so the restarted worker's first beat echoes what the control plane last gave. A
/// beat dropped mid-way would still land, the record would be a beat behind, and the restart
/// would be refused (412): the session lost, its item handed out again.
#[test]
fn a_heartbeat_in_flight_at_shutdown_is_recorded_and_the_restart_keeps_the_lease() {
    // A lease long enough for a slow machine's restart (the old worker's exit, two seconds, the
    // new one's start) to come well within it.
    let cp = Cp::start(Duration::from_secs(8));
    let state = TempDir::new("w-restart");
    let (s, _) = cp.session(vec![bash("echo one")]);
    let mut w = start_worker(&cp, state.path(), &["--max-idle", "1h"]);
    cp.wait_for("the call's answer", Duration::from_secs(30), || cp.view(&s).calls[0].result.is_some());
    // The next beat reaches the control plane 1.5 s late; the worker is told to stop meanwhile.
    cp.faults(vec![Fault {
        kind: FaultKind::Delayed,
        count: 1,
        path_contains: Some("/heartbeat".into()),
        method: None,
        after: false,
    }]);
    cp.wait_for("a beat to be on its way", Duration::from_secs(10), || cp.pending_faults().is_empty());
    assert!(w.sigterm().success());
    // The beat lands before the restart, as a real one does (in milliseconds, not 1.5 s).
    std::thread::sleep(Duration::from_secs(2));
    let _w = start_worker(&cp, state.path(), &["--max-idle", "1h"]);
    // Past a whole lease: a restart refused its lease would have let the item go back to the
    // queue, and it would have been handed out again.
    std::thread::sleep(Duration::from_secs(12));
    let v = cp.view(&s);
    assert_eq!(v.polls, 1, "the item was handed out again: the restart lost its lease: {v:#?}");
    assert_eq!(v.work_state, WorkState::Active, "{v:#?}");
}
