//! Renders a profile as the `tc qdisc ... netem ...` commands that give the same link on a
//! machine with `sch_netem`, so results here can be cross-checked there.
//!
//! The server's egress carries the down direction and the client's egress the up direction;
//! the devices are left as shell variables. Scheduled events have no tc equivalent and are
//! rendered as comments with the loop that approximates them.

use std::fmt::Write;

use crate::spec::{Direction, Profile, Stages};

/// netem's argument list for one direction (empty for a clean direction).
pub fn netem_args(s: &Stages) -> String {
    let mut a = String::new();
    if !s.delay.0.is_zero() || !s.jitter.0.is_zero() {
        let _ = write!(a, " delay {}", s.delay);
        if !s.jitter.0.is_zero() {
            let _ = write!(a, " {}", s.jitter);
            if !s.delay_correlation.is_zero() {
                let _ = write!(a, " {}", s.delay_correlation);
            }
            let _ = write!(a, " distribution {}", s.distribution);
        }
    }
    if let Some(ge) = s.gemodel {
        let _ = write!(
            a,
            " loss gemodel {} {} {} {}",
            ge.p,
            ge.r(),
            ge.one_minus_h(),
            ge.one_minus_k()
        );
    } else if !s.loss.is_zero() {
        let _ = write!(a, " loss {}", s.loss);
        if !s.loss_correlation.is_zero() {
            let _ = write!(a, " {}", s.loss_correlation);
        }
    }
    for (name, p, corr) in [
        ("duplicate", s.duplicate, s.duplicate_correlation),
        ("corrupt", s.corrupt, s.corrupt_correlation),
    ] {
        if !p.is_zero() {
            let _ = write!(a, " {name} {p}");
            if !corr.is_zero() {
                let _ = write!(a, " {corr}");
            }
        }
    }
    if !s.reorder.is_zero() {
        let _ = write!(a, " reorder {}", s.reorder);
        if !s.reorder_correlation.is_zero() {
            let _ = write!(a, " {}", s.reorder_correlation);
        }
        if s.gap() > 1 {
            let _ = write!(a, " gap {}", s.gap());
        }
    }
    if let Some(rate) = s.rate {
        let _ = write!(a, " rate {rate}");
    }
    if let Some(limit) = s.limit {
        let _ = write!(a, " limit {limit}");
    }
    a.trim_start().to_owned()
}

/// The whole script for a profile.
pub fn script(profile: &Profile) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# netem profile {:?}: {}",
        profile.name, profile.description
    );
    let _ = writeln!(out, "# source: {}", profile.source);
    let _ = writeln!(
        out,
        "# Set SERVER_DEV to the server side's interface and CLIENT_DEV to the client side's."
    );
    for direction in [Direction::Down, Direction::Up] {
        let (dev, what) = match direction {
            Direction::Down => (
                "$SERVER_DEV",
                "down: server -> client, on the server's egress",
            ),
            Direction::Up => (
                "$CLIENT_DEV",
                "up: client -> server, on the client's egress",
            ),
        };
        let args = netem_args(profile.stages(direction));
        let _ = writeln!(out, "# {what}");
        if args.is_empty() {
            let _ = writeln!(out, "tc qdisc del dev {dev} root 2>/dev/null || true");
        } else {
            let _ = writeln!(out, "tc qdisc replace dev {dev} root netem {args}");
        }
    }
    if let Some(b) = profile.events.blackouts {
        let duration = b.duration.map_or_else(|| "0ms".into(), |d| d.to_string());
        let _ = writeln!(
            out,
            "# blackouts: gap {}, duration {duration}{}: no tc equivalent; approximate with a loop of\n\
             #   tc qdisc change dev $DEV root netem <args> loss 100%; sleep <duration>; tc qdisc change dev $DEV root netem <args>",
            b.gap,
            b.count.map_or(String::new(), |c| format!(", {c} times")),
        );
    }
    if let Some(c) = profile.events.address_changes {
        let _ = writeln!(
            out,
            "# address changes every {}: no tc equivalent (use `netem relay`, which rebinds the client's upstream port)",
            c.gap
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Profiles;
    use crate::units::Time;

    #[test]
    fn reference_condition_renders_as_tc_would_take_it() {
        let profiles = Profiles::builtin();
        let s = script(profiles.find("lossy-5").unwrap());
        assert!(
            s.contains("tc qdisc replace dev $SERVER_DEV root netem delay 25ms loss 5%\n"),
            "{s}"
        );
        assert!(s.contains("tc qdisc del dev $CLIENT_DEV root"), "{s}");
    }

    #[test]
    fn every_stage_renders() {
        let stages = Stages {
            delay: Time(std::time::Duration::from_millis(100)),
            jitter: Time(std::time::Duration::from_millis(10)),
            delay_correlation: "25%".parse().unwrap(),
            distribution: crate::spec::Distribution::Normal,
            gemodel: Some("1%,25%".parse().unwrap()),
            duplicate: "1%".parse().unwrap(),
            corrupt: "0.1%".parse().unwrap(),
            reorder: "25%".parse().unwrap(),
            gap: Some(5),
            rate: Some("1mbit".parse().unwrap()),
            limit: Some(100),
            ..Stages::default()
        };
        assert_eq!(
            netem_args(&stages),
            "delay 100ms 10ms 25% distribution normal loss gemodel 1% 25% 100% 0% duplicate 1% \
             corrupt 0.1% reorder 25% gap 5 rate 1mbit limit 100"
        );
        for p in Profiles::builtin().list {
            script(&p);
        }
    }
}
