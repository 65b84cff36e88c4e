//! Where instances run: a pure function of the desired count and the alive
//! hosts, so that every replica of the control plane computes the same
//! placement from the same database, and each agent's share is stable
//! between heartbeats.

/// Instances an app should have before autoscaling exists: at least one
/// (there is no scale-to-zero yet), at most `max`.
pub fn desired_count(min: u32, max: u32) -> u32 {
    min.max(1).min(max.max(1))
}

/// Spreads `count` instances over `hosts` hosts (sorted by id by the caller):
/// each gets `count / hosts`, and the first `count % hosts` one more.
pub fn place(count: u32, hosts: usize) -> Vec<u32> {
    if hosts == 0 {
        return Vec::new();
    }
    let h = u32::try_from(hosts).unwrap_or(u32::MAX);
    let base = count / h;
    let extra = (count % h) as usize;
    (0..hosts).map(|i| base + u32::from(i < extra)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_is_clamped() {
        assert_eq!(desired_count(0, 4), 1);
        assert_eq!(desired_count(2, 4), 2);
        assert_eq!(desired_count(5, 3), 3);
        assert_eq!(desired_count(0, 0), 1);
    }

    #[test]
    fn spread_is_even_with_remainder_first() {
        assert_eq!(place(5, 3), vec![2, 2, 1]);
        assert_eq!(place(1, 3), vec![1, 0, 0]);
        assert_eq!(place(6, 3), vec![2, 2, 2]);
        assert_eq!(place(0, 2), vec![0, 0]);
        assert!(place(3, 0).is_empty());
        for n in 0..20 {
            for h in 1..6 {
                let p = place(n, h);
                assert_eq!(p.iter().sum::<u32>(), n);
                assert!(p.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
                assert_eq!(p, place(n, h), "deterministic");
            }
        }
    }
}
