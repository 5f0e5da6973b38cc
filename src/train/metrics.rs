//! Classification metrics: accuracy and quadratic weighted kappa (QWK), and process memory.

/// Quadratic weighted kappa between true and predicted classes in `0..classes`.
/// 1 = perfect agreement, 0 = chance. When both sides are one constant class, it is 1 if they
/// agree and 0 otherwise.
pub fn quadratic_weighted_kappa(truth: &[i64], predicted: &[i64], classes: usize) -> f64 {
    assert_eq!(truth.len(), predicted.len());
    let n = truth.len();
    if n == 0 || classes < 2 {
        return 0.0;
    }
    let mut observed = vec![vec![0.0f64; classes]; classes];
    let mut hist_t = vec![0.0f64; classes];
    let mut hist_p = vec![0.0f64; classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        let (t, p) = (
            t.clamp(0, classes as i64 - 1) as usize,
            p.clamp(0, classes as i64 - 1) as usize,
        );
        observed[t][p] += 1.0;
        hist_t[t] += 1.0;
        hist_p[p] += 1.0;
    }
    let (mut num, mut den) = (0.0, 0.0);
    let scale = ((classes - 1) * (classes - 1)) as f64;
    for i in 0..classes {
        for j in 0..classes {
            let w = ((i as f64 - j as f64).powi(2)) / scale;
            num += w * observed[i][j];
            den += w * hist_t[i] * hist_p[j] / n as f64;
        }
    }
    if den == 0.0 {
        return if num == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - num / den
}

/// Peak resident memory of this process so far, in bytes (VmHWM), or 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// Resident memory of this process now, in bytes (VmRSS), or 0 where unknown.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwk_is_one_for_perfect_and_penalises_far_errors_more() {
        let t = [0, 1, 2, 3, 0, 1, 2, 3];
        assert!((quadratic_weighted_kappa(&t, &t, 4) - 1.0).abs() < 1e-12);
        let near = [1, 1, 2, 3, 0, 1, 2, 2];
        let far = [3, 1, 2, 3, 0, 1, 2, 0];
        let (qn, qf) = (
            quadratic_weighted_kappa(&t, &near, 4),
            quadratic_weighted_kappa(&t, &far, 4),
        );
        assert!(qn > qf && qn < 1.0, "{qn} {qf}");
        // A value worked by hand: num = 1/4, den = 5/4.
        let q = quadratic_weighted_kappa(&[0, 1, 2], &[0, 2, 2], 3);
        assert!((q - 0.8).abs() < 1e-9, "{q}");
    }
}
