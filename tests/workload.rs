//! The workload side on the real control plane: a command run under `kubectl lock run`
//! never outlives its lock, however the plugin dies; signals are forwarded; nothing
//! accumulates; identities are unique; and the sidecar holds a lock for any language.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit as support;
use testkit::{create_claim, spec, wait_phase, Operator};
use tokio::time::Instant;

const GC: Duration = Duration::from_secs(300);

fn plugin(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new(testkit::bin!("kubectl-lock"));
    c.args(["-n", ns])
        .args(args)
        .env("KUBECONFIG", support::kubeconfig_path())
        .env_remove("POD_NAME")
        .env_remove("POD_UID");
    c
}

fn scratch(name: &str) -> PathBuf {
    let p = support::root().join(format!("target/workload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn signal(child: &Child, sig: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), sig);
}

/// Every descendant of `pid` (from /proc).
fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut table = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        if let Some(ppid) = f.next().and_then(|x| x.parse::<u32>().ok()) {
            if state != "Z" {
                table.push((p, ppid));
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut frontier = vec![pid];
    while let Some(x) = frontier.pop() {
        for &(p, pp) in &table {
            if pp == x && out.insert(p) {
                frontier.push(p);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn live_claims(client: &Client, ns: &str) -> Vec<LockClaim> {
    Api::<LockClaim>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list")
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_01_a_command_and_its_descendants_die_before_the_next_grant_when_the_plugin_is_sigkilled(
) {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-sigkill").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let granted_at = scratch("granted");
    // The command ignores every polite signal and starts grandchildren, one of them in a
    // session of its own (out of the process group).
    let mut first = plugin(
        &ns,
        &[
            "run",
            "jobx",
            "--ttl",
            "3s",
            "--",
            "sh",
            "-c",
            "trap '' INT TERM HUP QUIT; sleep 600 & setsid sleep 600 & sleep 600",
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .expect("plugin");
    let plugin_pid = first.id();
    wait_until("command tree started", Duration::from_secs(20), || {
        descendants(plugin_pid).len() >= 5
    })
    .await;
    let tree = descendants(plugin_pid);
    let script = format!("date +%s%N > {}", granted_at.display());
    let mut second = plugin(
        &ns,
        &["run", "jobx", "--ttl", "3s", "--", "sh", "-c", &script],
    )
    .spawn()
    .expect("second plugin");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !granted_at.exists(),
        "the second ran while the first held the lock"
    );
    let killed = Instant::now();
    signal(&first, Signal::SIGKILL);
    let _ = first.wait();
    wait_until("every descendant gone", Duration::from_secs(5), || {
        tree.iter().all(|p| !alive(*p))
    })
    .await;
    let gone_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let gone_wall = jiff::Timestamp::now().as_nanosecond();
    assert!(second.wait().expect("second").success());
    let granted: i128 = std::fs::read_to_string(&granted_at)
        .expect("the second ran")
        .trim()
        .parse()
        .expect("ns");
    println!(
        "workload_01: plugin SIGKILLed -> last of {} descendants gone in {gone_ms:.1} ms; next holder's command ran {:.1} ms after that",
        tree.len(),
        (granted - gone_wall) as f64 / 1e6
    );
    assert!(
        gone_ms < 1000.0,
        "descendants outlived the plugin by {gone_ms} ms"
    );
    assert!(
        granted > gone_wall - 5_000_000,
        "the next holder ran before the tree was gone"
    );
    let left = live_claims(&client, &ns).await;
    assert!(
        left.is_empty(),
        "claims left: {:?}",
        left.iter()
            .map(|c| c.metadata.name.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_02_signals_are_forwarded_a_second_one_kills_and_a_loss_is_acted_on_after_a_signal(
) {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-signals").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let log = scratch("signals");
    let script = format!(
        "for s in HUP INT TERM QUIT; do trap \"echo got-$s >> {l}\" $s; done; echo up >> {l}; while true; do sleep 0.05; done",
        l = log.display()
    );
    let mut p = plugin(
        &ns,
        &["run", "sig", "--ttl", "3s", "--", "sh", "-c", &script],
    )
    .spawn()
    .expect("plugin");
    wait_until("command up", Duration::from_secs(20), || log.exists()).await;
    // HUP, QUIT and a first INT reach the command (it traps them and goes on).
    for (sig, seen) in [
        (Signal::SIGHUP, "got-HUP"),
        (Signal::SIGQUIT, "got-QUIT"),
        (Signal::SIGINT, "got-INT"),
    ] {
        signal(&p, sig);
        wait_until(seen, Duration::from_secs(5), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(seen)
        })
        .await;
    }
    // A second interrupt: SIGKILL at once.
    signal(&p, Signal::SIGINT);
    let status = p.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(137),
        "the second interrupt SIGKILLs the command: {status:?}"
    );

    // After a forwarded signal the plugin still acts on a lost lock.
    let log = scratch("signals-lost");
    let script = format!(
        "trap 'echo got-TERM >> {l}' TERM; echo up >> {l}; while true; do sleep 0.05; done",
        l = log.display()
    );
    let mut p = plugin(
        &ns,
        &["run", "sig2", "--ttl", "3s", "--", "sh", "-c", &script],
    )
    .spawn()
    .expect("plugin");
    wait_until("command up", Duration::from_secs(20), || log.exists()).await;
    signal(&p, Signal::SIGTERM);
    wait_until("got-TERM", Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("got-TERM")
    })
    .await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let name = live_claims(&client, &ns)
        .await
        .into_iter()
        .find(|c| c.spec.lease_name == "sig2")
        .and_then(|c| c.metadata.name)
        .expect("claim");
    claims
        .delete(&name, &Default::default())
        .await
        .expect("a third party deletes the claim");
    let status = p.wait().expect("wait");
    assert_eq!(status.code(), Some(123), "lost: the command was stopped");
}

/// How a run ends, for the no-accumulation test.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Exits,
    PluginSigterm,
    PluginSigint,
    PluginSigkill,
    ClaimDeleted,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_03_a_hundred_runs_ended_every_way_leave_no_claim_behind_past_their_ttl() {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-leftovers").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let endings = [
        Ending::Exits,
        Ending::PluginSigterm,
        Ending::PluginSigint,
        Ending::PluginSigkill,
        Ending::ClaimDeleted,
    ];
    let mut counts = std::collections::BTreeMap::new();
    for batch in 0..10 {
        let mut runs = Vec::new();
        for i in 0..10 {
            let n = batch * 10 + i;
            let ending = endings[n % endings.len()];
            let lock = format!("l{n}");
            let cmd = if matches!(ending, Ending::Exits) {
                "sleep 0.3"
            } else {
                "sleep 600"
            };
            let p = plugin(
                &ns,
                &[
                    "run",
                    &lock,
                    "--ttl",
                    "2s",
                    "--keep-finished",
                    "5s",
                    "--",
                    "sh",
                    "-c",
                    cmd,
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("plugin");
            runs.push((lock, ending, p));
        }
        for (lock, _, _) in &runs {
            let t0 = Instant::now();
            while !live_claims(&client, &ns)
                .await
                .iter()
                .any(|c| c.spec.lease_name == *lock && c.phase() == Some(Phase::Granted))
            {
                if t0.elapsed() > Duration::from_secs(20) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for (lock, ending, p) in &mut runs {
            match ending {
                Ending::Exits => {}
                Ending::PluginSigterm => signal(p, Signal::SIGTERM),
                Ending::PluginSigint => signal(p, Signal::SIGINT),
                Ending::PluginSigkill => signal(p, Signal::SIGKILL),
                Ending::ClaimDeleted => {
                    for c in live_claims(&client, &ns)
                        .await
                        .into_iter()
                        .filter(|c| c.spec.lease_name == **lock)
                    {
                        let _ = claims
                            .delete(&c.metadata.name.unwrap_or_default(), &Default::default())
                            .await;
                    }
                }
            }
            *counts.entry(format!("{ending:?}")).or_insert(0) += 1;
        }
        for (_, _, p) in &mut runs {
            let _ = p.wait();
        }
    }
    // Inside their TTL some may still be there; past it (5 s, plus a second of
    // metav1.Time rounding), none.
    let t0 = Instant::now();
    loop {
        let left = live_claims(&client, &ns).await;
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(12),
            "claims left past their TTL: {:?}",
            left.iter()
                .map(|c| (c.metadata.name.clone(), c.phase()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "workload_03: 100 runs ended by {counts:?}: no claim left {:.1} s after the last",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_04_default_identities_are_unique_and_release_only_frees_its_own_claim() {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-identity").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let out = plugin(&ns, &["acquire", "maint", "--wait", "20s"])
        .output()
        .expect("acquire");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let identity = text
        .split(" as ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("identity printed")
        .to_string();
    // A second acquire with the default identity is another claimant: it waits (and
    // times out here), it never reports "already held".
    let out = plugin(&ns, &["acquire", "maint", "--wait", "2s"])
        .output()
        .expect("acquire");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("already held"));
    // release needs to know whose claim; another identity's is refused without --force.
    let out = plugin(&ns, &["release", "maint"])
        .output()
        .expect("release");
    assert_eq!(out.status.code(), Some(125));
    let claim = format!("maint-{identity}");
    let out = plugin(
        &ns,
        &["release", "maint", "--claim", &claim, "--identity", "bob"],
    )
    .output()
    .expect("release");
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        claims.get(&claim).await.expect("still there").phase(),
        Some(Phase::Granted)
    );
    let out = plugin(&ns, &["release", "maint", "--identity", &identity])
        .output()
        .expect("release");
    assert!(out.status.success(), "{out:?}");
    assert!(claims.get_opt(&claim).await.expect("read").is_none());
}

/// A sidecar process on `port` holding `lease` (token file `file`).
fn sidecar(ns: &str, lease: &str, port: u16, file: &Path) -> Child {
    plugin(
        ns,
        &[
            "sidecar",
            lease,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ttl",
            "3s",
        ],
    )
    .arg("--token-file")
    .arg(file)
    .stderr(Stdio::null())
    .spawn()
    .expect("sidecar")
}

async fn get(port: u16) -> (u16, String) {
    let text = support::scrape_full(&format!("127.0.0.1:{port}"), "/").await;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_05_the_sidecar_says_200_with_the_token_only_on_the_holder_and_hands_over() {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-sidecar").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let (pa, pb) = (support::free_port(), support::free_port());
    let (fa, fb) = (scratch("token-a"), scratch("token-b"));
    let mut a = sidecar(&ns, "app-leader", pa, &fa);
    wait_until("a holds", Duration::from_secs(20), || fa.exists()).await;
    let mut b = sidecar(&ns, "app-leader", pb, &fb);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ((ca, ta), (cb, _)) = (get(pa).await, get(pb).await);
    assert_eq!((ca, cb), (200, 503), "exactly one holder answers 200");
    let token = std::fs::read_to_string(&fa)
        .expect("token file")
        .trim()
        .to_string();
    assert!(
        ta.to_lowercase()
            .contains(&format!("x-fencing-token: {token}")),
        "{ta}"
    );
    assert!(ta.trim_end().ends_with(&token), "token in the body: {ta}");
    assert!(!fb.exists());
    // SIGTERM (the Pod is going): the other takes over at once.
    let t0 = Instant::now();
    signal(&a, Signal::SIGTERM);
    let _ = a.wait();
    let mut took = None;
    while took.is_none() && t0.elapsed() < Duration::from_secs(10) {
        if get(pb).await.0 == 200 {
            took = Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = took.expect("b took over");
    let token_b: i64 = std::fs::read_to_string(&fb)
        .expect("b's token")
        .trim()
        .parse()
        .expect("int");
    assert!(
        token_b > token.parse::<i64>().expect("int"),
        "tokens rise across the handover"
    );
    println!(
        "workload_05: sidecar SIGTERM -> the other sidecar answers 200 after {:.1} ms",
        took.as_secs_f64() * 1000.0
    );
    signal(&b, Signal::SIGKILL);
    let _ = b.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_06_a_signal_while_waiting_withdraws_the_claim_and_the_next_waiter_is_granted_at_once(
) {
    let client = support::client().await;
    let ns = support::namespace(&client, "wl-withdraw").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    // The lock is held by someone else for the whole test.
    create_claim(&claims, "holder", spec("busy")).await;
    wait_phase(&claims, "holder", Phase::Granted, Duration::from_secs(20)).await;
    for (sig, code, verb) in [
        (Signal::SIGINT, 130, "run"),
        (Signal::SIGTERM, 143, "run"),
        (Signal::SIGHUP, 129, "run"),
        (Signal::SIGINT, 130, "acquire"),
    ] {
        let mut args = vec![verb, "busy", "--ttl", "15s"];
        if verb == "run" {
            args.extend(["--", "true"]);
        }
        let mut p = plugin(&ns, &args).spawn().expect("plugin");
        // Waiting: its claim is Pending behind the holder.
        let waiting = || async {
            live_claims(&client, &ns)
                .await
                .into_iter()
                .filter(|c| c.metadata.name.as_deref() != Some("holder"))
                .count()
        };
        let t0 = std::time::Instant::now();
        while waiting().await == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no claim from {verb}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal(&p, sig);
        let status = p.wait().expect("wait");
        assert_eq!(
            status.code(),
            Some(code),
            "{verb} stopped by {sig}: {status:?}"
        );
        // The claim is gone by the time the process has exited (asserted within 2 s).
        let t1 = std::time::Instant::now();
        while waiting().await > 0 {
            assert!(
                t1.elapsed() < Duration::from_secs(2),
                "{verb} left its claim after {sig}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A waiter behind a withdrawn one is granted as soon as the holder goes, not a lease
    // duration later (a dead waiter's claim would have been granted first).
    let mut first = plugin(&ns, &["run", "busy", "--ttl", "15s", "--", "true"])
        .spawn()
        .expect("first waiter");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = scratch("withdraw-second");
    let second_cmd = format!("echo ran > {}", log.display());
    let mut second = plugin(
        &ns,
        &["run", "busy", "--ttl", "15s", "--", "sh", "-c", &second_cmd],
    )
    .spawn()
    .expect("second waiter");
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&first, Signal::SIGINT);
    assert_eq!(first.wait().expect("wait").code(), Some(130));
    let freed = std::time::Instant::now();
    claims
        .delete("holder", &Default::default())
        .await
        .expect("the holder leaves");
    let status = second.wait().expect("second");
    assert_eq!(status.code(), Some(0), "the second waiter's command ran");
    assert!(log.exists());
    let took = freed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the second waiter waited on the withdrawn one's lease: {took:?}"
    );
}
