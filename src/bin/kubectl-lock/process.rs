//! Process trees, read from /proc: every descendant of a process, and killing them all.
//! A command run under a lock must not outlive the hold, grandchildren included, also
//! the ones that left its process group.

use std::collections::{BTreeMap, BTreeSet};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// (pid, parent pid) of every process, from /proc/PID/stat.
fn parents() -> BTreeMap<i32, i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_of(&stat)?))
        })
        .collect()
}

/// The parent pid in a /proc/PID/stat line (after the command name, which may itself
/// hold spaces and parentheses: the last ')' ends it).
pub fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every descendant of `root` in the table (pid -> parent).
pub fn descendants_in(table: &BTreeMap<i32, i32>, root: i32) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, &ppid) in table {
            if ppid == p && pid != root && out.insert(pid) {
                frontier.push(pid);
            }
        }
    }
    out
}

/// Every live descendant of `root`.
pub fn descendants(root: i32) -> BTreeSet<i32> {
    descendants_in(&parents(), root)
}

/// SIGKILL to process group `group` and to every descendant of `root`, until none is
/// left (killing a parent reparents its children to the subreaper `root`).
pub fn kill_tree(root: i32, group: Option<i32>) {
    if let Some(g) = group {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    for _ in 0..50 {
        let left = descendants(root);
        if left.is_empty() {
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        reap_zombies();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Collects every exited child (zombie) of this process without blocking.
pub fn reap_zombies() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if matches!(s, WaitStatus::StillAlive) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_and_parentheses_in_the_name_parses() {
        let stat = "4242 (my (odd) cmd) S 17 4242 4242 0 -1 4194560 ...";
        assert_eq!(parent_of(stat), Some(17));
    }

    #[test]
    fn descendants_include_grandchildren_and_nothing_else() {
        let table: BTreeMap<i32, i32> = [
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 11),
            (13, 10),
            (20, 1),
            (21, 20),
        ]
        .into();
        assert_eq!(descendants_in(&table, 10), [11, 12, 13].into());
        assert!(descendants_in(&table, 12).is_empty());
    }

    #[test]
    fn a_process_tree_that_leaves_its_group_is_killed_whole() {
        // A shell whose child starts a new session (out of the process group), whose own
        // child sleeps: all three are this test process's descendants.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "setsid sh -c 'sleep 300 & sleep 300' & sleep 300"])
            .spawn()
            .expect("sh");
        let me = std::process::id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while descendants(me).len() < 5 {
            assert!(std::time::Instant::now() < deadline, "tree did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let tree = descendants(me);
        kill_tree(me, None);
        let _ = sh.wait();
        let alive: Vec<i32> = tree
            .iter()
            .copied()
            .filter(|p| std::fs::metadata(format!("/proc/{p}")).is_ok() && !is_zombie(*p))
            .collect();
        assert!(alive.is_empty(), "still alive: {alive:?}");
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s[s.rfind(')')? + 1..]
                    .split_whitespace()
                    .next()
                    .map(|x| x == "Z")
            })
            .unwrap_or(true)
    }
}
