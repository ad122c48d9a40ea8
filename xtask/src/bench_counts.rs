//! Per-request accounting for `cargo xtask bench blk`: after every `bench blk: via=` line the
//! microvisor prints the cumulative exit counts of every live domain
//! (`[microvisor] counts: <name> exits=… hc=… hlt=… int=… sw=… virq=… sig=…; …`). The
//! difference between the counts line after a result and the one before it is what that
//! run cost the whole machine (both sides take turns, so nothing else runs meanwhile but
//! the other side's wait); divided by the run's requests it gives exits, world switches,
//! virtual interrupts and doorbells per request, which do not depend on the host's load.

use std::collections::BTreeMap;

/// The counted fields, in the order they are kept.
/// (`run`: nanoseconds in guest mode, instructions under `-icount`; `idle`: nanoseconds the
/// whole machine was idle, and `now` its clock, on the pseudo-domain `(machine)`.)
pub const FIELDS: [&str; 10] = ["exits", "hc", "hlt", "int", "sw", "virq", "sig", "idle", "run", "now"];

/// One domain's counts.
pub type Counts = [u64; FIELDS.len()];

/// Every live domain's counts of one `counts:` line, by domain name.
pub fn parse_counts(line: &str) -> Option<BTreeMap<String, Counts>> {
    let rest = line.split("counts:").nth(1)?;
    let mut all = BTreeMap::new();
    for part in rest.split(';') {
        let mut words = part.split_ascii_whitespace();
        let Some(name) = words.next() else { continue };
        let mut c = [0u64; FIELDS.len()];
        for w in words {
            let (k, v) = w.split_once('=')?;
            if let Some(i) = FIELDS.iter().position(|f| *f == k) {
                c[i] = v.parse().ok()?;
            }
        }
        all.insert(name.to_string(), c);
    }
    Some(all)
}

/// The summed counts of every domain from `before` to `after`.
fn total_delta(before: &BTreeMap<String, Counts>, after: &BTreeMap<String, Counts>) -> Counts {
    let mut sum = [0u64; FIELDS.len()];
    for (name, a) in after {
        let b = before.get(name).copied().unwrap_or([0; FIELDS.len()]);
        for ((acc, x), y) in sum.iter_mut().zip(a).zip(b) {
            *acc += x.saturating_sub(y);
        }
    }
    sum
}

/// Per (via, workload): the machine's counts per request, summed over the rounds, from the
/// console `lines` (a result line, then its counts line). `requests(line)` gives a result
/// line's (via, workload, requests).
pub fn per_request(
    lines: &[String],
    requests: impl Fn(&str) -> Option<(String, String, u64)>,
) -> BTreeMap<(String, String), [f64; FIELDS.len()]> {
    let mut sums: BTreeMap<(String, String), (Counts, u64)> = BTreeMap::new();
    let mut last: Option<BTreeMap<String, Counts>> = None;
    let mut result: Option<(String, String, u64)> = None;
    for l in lines {
        if let Some(r) = requests(l) {
            result = Some(r);
        } else if let Some(now) = parse_counts(l) {
            if let (Some(before), Some((via, name, n))) = (last.as_ref(), result.take()) {
                let d = total_delta(before, &now);
                let e = sums.entry((via, name)).or_insert(([0; FIELDS.len()], 0));
                for (acc, x) in e.0.iter_mut().zip(d) {
                    *acc += x;
                }
                e.1 += n;
            }
            last = Some(now);
        }
    }
    sums.into_iter().map(|(k, (c, n))| (k, c.map(|x| x as f64 / n.max(1) as f64))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_counts_line() {
        let l = "[microvisor] counts: dom0 exits=5 hc=4 hlt=0 int=1 sw=2 virq=0 sig=3; disk exits=10 hc=2 hlt=3 int=4 sw=5 virq=6 sig=7;";
        let c = parse_counts(l).unwrap();
        assert_eq!(c["dom0"], [5, 4, 0, 1, 2, 0, 3, 0, 0, 0]);
        assert_eq!(c["disk"], [10, 2, 3, 4, 5, 6, 7, 0, 0, 0]);
        let m = parse_counts("[microvisor] counts: a exits=1; (machine) idle=77;").unwrap();
        assert_eq!(m["(machine)"][7], 77);
        assert!(parse_counts("[guest] ready").is_none());
    }

    #[test]
    fn divides_each_runs_delta_by_its_requests() {
        let lines: Vec<String> = [
            "[microvisor] counts: a exits=10 hc=0 hlt=0 int=0 sw=0 virq=0 sig=0;",
            "R driver w 4",
            "[microvisor] counts: a exits=18 hc=4 hlt=0 int=0 sw=0 virq=0 sig=0; b exits=4 hc=0 hlt=0 int=0 sw=0 virq=0 sig=0;",
            "R direct w 4",
            "[microvisor] counts: a exits=20 hc=4 hlt=0 int=0 sw=0 virq=0 sig=0; b exits=6 hc=0 hlt=0 int=0 sw=0 virq=0 sig=0;",
        ]
        .map(String::from)
        .to_vec();
        let parse = |l: &str| {
            let w: Vec<&str> = l.split(' ').collect();
            (w[0] == "R").then(|| (w[1].to_string(), w[2].to_string(), w[3].parse().unwrap()))
        };
        let p = per_request(&lines, parse);
        assert_eq!(p[&("driver".to_string(), "w".to_string())][0], 3.0); // (8 + 4) / 4
        assert_eq!(p[&("driver".to_string(), "w".to_string())][1], 1.0);
        assert_eq!(p[&("direct".to_string(), "w".to_string())][0], 1.0); // (2 + 2) / 4
    }
}
