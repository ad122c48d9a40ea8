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
