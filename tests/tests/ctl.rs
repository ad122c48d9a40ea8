//! dom0's host control interface (`cargo xtask ctl`): a virtio console dom0 drives by
//! passthrough, on a unix socket QEMU listens on.

use ipc_spec::ctl::State;
use stack_tests::*;

#[test]
fn ctl_lists_kills_and_restarts_domains_and_refuses_bad_input() {
    let m = stack_machine("tests/stacks/ctl-disk.toml", "");
    let port = m.net_ports[0];
    let machine = m.clone();
    let run = run_serving(&m, &["[guest]"], move || {
        let mut c = ctl(&machine);
        let t0 = std::time::Instant::now();
        let list = c.list().expect("list");
        let names: Vec<&str> = list.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(names, ["dom0", "disk", "guest", "net"]);
        assert!(list.iter().all(|(_, s, ..)| *s == State::Running), "{list:?}");
        let disk =
            |c: &mut xtask::ctl::Ctl| c.list().expect("list").into_iter().find(|(n, ..)| n == "disk").expect("disk");
        let before = disk(&mut c);
        assert!(before.3.is_some(), "dom0 counts the disk driver's answers: {before:?}");

        // kill: a crash as far as the restart policy is concerned; the guest's disk works on.
        let (_, words) = c.request("kill disk").expect("kill disk");
        assert!(words.starts_with("killed disk"), "{words}");
        let after = disk(&mut c);
        assert_eq!(after.2, before.2 + 1, "one more restart: {after:?}");
        let data = noise(8 * 512, 5);
        let mut s = connect(port);
        assert_eq!(request(&mut s, "PUT", "/blk/9000", &data).0, 200);
        assert_eq!(request(&mut s, "GET", "/blk/9000?count=8", b""), (200, data.clone()));

        // restart: now, whatever the policy.
        let (_, words) = c.request("restart disk").expect("restart disk");
        assert_eq!(words, "restarted disk");
        assert_eq!(disk(&mut c).2, before.2 + 2);
        assert_eq!(request(&mut s, "GET", "/blk/9000?count=8", b""), (200, data));

        // Bad input: an error line each, and the connection goes on.
        for (bad, why) in [
            ("reboot", "unknown command"),
            ("kill", "needs a domain name"),
            ("kill nobody", "no domain \"nobody\""),
            ("restart guest", "restart = \"never\""),
            ("kill disk now", "unexpected \"now\""),
            ("", "empty command"),
            (&"x".repeat(300), "longer than"),
        ] {
            let e = c.request(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let (help, _) = c.request("help").expect("help");
        assert!(help.iter().any(|l| l.starts_with("kill NAME")), "{help:?}");
        eprintln!("ctl: every request answered in {:?} in all", t0.elapsed());
        // A second client on the socket after the first left.
        drop(c);
        assert_eq!(ctl(&machine).list().expect("list").len(), 4);
    });
    // (The console lines printed while the client ran are not read: the run stops after it.)
    assert_line(&run, "[dom0] control: virtio-console (device");
    assert_no_line(&run, "FATAL");
}

/// Sectors the kill test writes and reads: past the guest self-test's first run.
const FIRST: u64 = 4096;
const SPAN: u64 = 4096;

/// Random writes and reads of random sectors through the demo guest's HTTP interface while
/// the disk driver VM is killed `kills` times or more, by itself (`rogue=crash-after`) and by
/// `ctl kill` at random times; every request must succeed, every read must return what was
/// written, and the host's image must hold every write (all acknowledged, the last flush
/// after them) afterwards.
fn kill_test(kills: u64) {
    let seed = kill_seed();
    eprintln!("kill test: seed {seed} (KILL_SEED={seed} replays the choices), {kills} kills");
    let m = stack_machine("tests/stacks/ctl-disk.toml", "");
    let disk = m.disks[0].clone();
    let port = m.net_ports[0];
    let machine = m.clone();
    let model = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; (SPAN * 512) as usize]));
    let model_after = model.clone();
    let run = run_serving(&m, &["[guest]"], move || {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // QEMU's socket serves one client at a time: one connection, shared.
        let shared = std::sync::Arc::new(std::sync::Mutex::new(ctl(&machine)));
        // The killer: `ctl kill disk` at random moments, 100 to 500 ms apart.
        let killer = {
            let (stop, shared) = (stop.clone(), shared.clone());
            let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(100 + rng.below(400)));
                    let answer = shared.lock().expect("ctl").request("kill disk");
                    match answer {
                        Ok(_) => sent += 1,
                        // Killed by itself a moment ago and being rebuilt: not an error.
                        Err(e) if e.contains("is restarting") || e.contains("is dead") => {}
                        Err(e) => panic!("ctl kill disk: {e}"),
                    }
                }
                sent
            })
        };
        let restarts = || {
            let list = shared.lock().expect("ctl").list().expect("ctl list");
            list.into_iter().find(|(n, ..)| n == "disk").map_or(0, |(_, _, r, _)| r)
        };
        let start_restarts = restarts();
        let mut rng = Rng(seed);
        let mut s = connect(port);
        let t0 = std::time::Instant::now();
        let (mut writes, mut reads, mut flushes, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        loop {
            let lba = FIRST + rng.below(SPAN - 32);
            let count = 1 + rng.below(32);
            let at = ((lba - FIRST) * 512) as usize;
            let len = (count * 512) as usize;
            if rng.below(3) > 0 {
                let data = noise(len, rng.next_u64());
                let (status, body) = request(&mut s, "PUT", &format!("/blk/{lba}"), &data);
                assert_eq!(status, 200, "PUT /blk/{lba} ({count} sectors): {}", String::from_utf8_lossy(&body));
                model.lock().expect("model")[at..at + len].copy_from_slice(&data);
                writes += 1;
            } else {
                let (status, body) = request(&mut s, "GET", &format!("/blk/{lba}?count={count}"), b"");
                assert_eq!(status, 200, "GET /blk/{lba}?count={count}: {}", String::from_utf8_lossy(&body));
                assert!(body == model.lock().expect("model")[at..at + len], "sectors {lba}+{count} read back differ");
                reads += 1;
            }
            bytes += len as u64;
            if rng.below(8) == 0 {
                assert_eq!(request(&mut s, "POST", "/flush", b"").0, 200, "flush");
                flushes += 1;
            }
            if (writes + reads) % 16 == 0 && restarts() - start_restarts >= kills {
                break;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(600), "too slow: {} restarts", restarts());
        }
        assert_eq!(request(&mut s, "POST", "/flush", b"").0, 200, "final flush");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let by_ctl = killer.join().expect("the killer thread");
        let total = restarts() - start_restarts;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "kill test: {total} restarts in {secs:.1} s ({by_ctl} by ctl kill, the rest crashes by rogue=crash-after or the watchdog); {writes} writes, {reads} reads, {flushes} flushes, {:.0} KiB/s",
            bytes as f64 / 1024.0 / secs
        );
        assert!(by_ctl >= 5 && total > by_ctl, "kills must be mixed: {by_ctl} by ctl of {total}");
    });
    assert_no_line(&run, "FATAL");
    assert_no_line(&run, "restarting disk failed");
    // Every write was acknowledged and the last flush came after all of them.
    let image = std::fs::read(&disk).expect("reading the disk image");
    let model = model_after.lock().expect("model");
    for s in 0..SPAN as usize {
        let at = (FIRST as usize + s) * 512;
        assert!(
            image[at..at + 512] == model[s * 512..(s + 1) * 512],
            "sector {} differs in the image",
            FIRST as usize + s
        );
    }
}

#[test]
fn random_io_through_http_survives_50_kills_of_the_disk_driver_vm() {
    kill_test(std::env::var("KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(50));
}

#[test]
#[ignore = "long: 500 kills (cargo test -p stack-tests --test ctl -- --ignored)"]
fn random_io_through_http_survives_500_kills_of_the_disk_driver_vm() {
    kill_test(500);
}
