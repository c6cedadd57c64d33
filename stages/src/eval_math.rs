//! The numbers the eval stage reports: pass@k, maj@k, and means with standard errors.
//!
//! pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models
//! Trained on Code"): from `n` samples of which `c` are correct, the probability that at
//! least one of `k` samples drawn without replacement is correct. maj@k is DeepSeek-R1's
//! majority vote: the most common extracted answer among the samples, then verified.

use crate::tasks;

/// Unbiased pass@k, `1 − C(n−c, k) / C(n, k)`, computed as a running product so it never
/// forms a large binomial coefficient. `None` when the question makes no sense: `k == 0`,
/// `k > n`, or `c > n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        // Every draw of k samples contains a correct one.
        return Some(1.0);
    }
    // C(n−c, k) / C(n, k) = Π_{i = n−c+1}^{n} (1 − k / i)   (Chen et al., Fig. 3).
    let all_wrong: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Some(1.0 - all_wrong)
}

/// The result of a majority vote over sampled completions.
#[derive(Debug, Clone, PartialEq)]
pub struct MajorityVote {
    /// The most common extracted answer; `None` when no completion has one.
    pub answer: Option<String>,
    /// How many completions gave that answer.
    pub votes: usize,
    /// Whether that answer verifies against the reference.
    pub correct: bool,
}

/// maj@k over `completions` (normally the k samples): answers are extracted with
/// [`tasks::extract_answer_with`] (`fallback` as there) and vote by value
/// ([`tasks::canonical_answer`]: `1,234` with `1234`, `x = 5` with `5`, countdown expressions
/// with every expression of the same value), else by their trimmed text; completions without
/// an answer do not vote. A tie goes to the value that appeared first. The winning value is
/// represented by its most common spelling (the first on a tie), which is verified by
/// wrapping it in an `<answer>` block, so [`tasks::verify`] judges exactly the voted text.
pub fn majority_vote<S: AsRef<str>>(
    task: &str,
    reference: &str,
    completions: &[S],
    fallback: bool,
) -> MajorityVote {
    // value -> (first index, spellings with their counts in order of appearance)
    let mut votes: Vec<(String, Vec<(String, usize)>)> = Vec::new();
    for completion in completions {
        // A code reply's answer is the program its tests run, wherever it stands.
        let answer = match task {
            crate::code_exec::CODE_TASK => crate::code_exec::extract_code(completion.as_ref()),
            _ => tasks::extract_answer_with(task, completion.as_ref(), fallback),
        };
        let Some(answer) = answer else {
            continue;
        };
        let answer = answer.trim().to_owned();
        let value = tasks::canonical_answer(task, &answer).unwrap_or_else(|| answer.clone());
        let spellings = match votes.iter_mut().find(|(v, _)| *v == value) {
            Some((_, spellings)) => spellings,
            None => {
                votes.push((value, Vec::new()));
                &mut votes.last_mut().expect("just pushed").1
            }
        };
        match spellings.iter_mut().find(|(s, _)| *s == answer) {
            Some((_, count)) => *count += 1,
            None => spellings.push((answer, 1)),
        }
    }
    let total = |spellings: &[(String, usize)]| spellings.iter().map(|(_, c)| c).sum::<usize>();
    // Most votes; `max_by_key` keeps the last maximum, so scan in reverse for the first.
    let winner = votes
        .iter()
        .rev()
        .max_by_key(|(_, spellings)| total(spellings));
    match winner {
        Some((_, spellings)) => {
            let (answer, _) = spellings
                .iter()
                .rev()
                .max_by_key(|(_, c)| *c)
                .expect("a value has a spelling");
            let correct = tasks::verify(task, reference, &format!("<answer>{answer}</answer>"));
            MajorityVote {
                answer: Some(answer.clone()),
                votes: total(spellings),
                correct,
            }
        }
        None => MajorityVote {
            answer: None,
            votes: 0,
            correct: false,
        },
    }
}

/// The sample counts N of `maj@N` and `prm@N`: 1, 2, 4, … below `k`, then `k`.
pub fn at_n_sizes(k: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < k)
        .collect();
    sizes.push(k.max(1));
    sizes
}

/// For each N of [`at_n_sizes`]`(k)`, over the first N `completions`: whether their majority
/// answer verifies (as [`majority_vote`]), and, given PRM `scores` aligned with them, whether
/// the best by score ([`crate::prm_score::best_of`]) verifies (empty without scores).
pub fn at_n<S: AsRef<str>>(
    task: &str,
    reference: &str,
    completions: &[S],
    scores: Option<&[Option<dagrun_model::prm::SolutionScore>]>,
    k: usize,
    fallback: bool,
) -> (Vec<bool>, Vec<bool>) {
    let (mut majority, mut best) = (Vec::new(), Vec::new());
    for n in at_n_sizes(k) {
        let first = &completions[..n.min(completions.len())];
        majority.push(majority_vote(task, reference, first, fallback).correct);
        if let Some(scores) = scores {
            let pick = crate::prm_score::best_of(&scores[..n.min(scores.len())]);
            best.push(
                first
                    .get(pick)
                    .is_some_and(|c| tasks::verify_with(task, reference, c.as_ref(), fallback)),
            );
        }
    }
    (majority, best)
}

/// Arithmetic mean; `None` for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

/// Standard error of the mean: sample standard deviation (Bessel-corrected) over √n.
/// `None` for fewer than two values, where it is undefined.
pub fn stderr(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = mean(values)?;
    let sum_sq: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
    let variance = sum_sq / (n - 1) as f64;
    Some((variance / n as f64).sqrt())
}

/// A mean with its standard error and sample count, as the summary table prints it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    /// `None` for a single value.
    pub stderr: Option<f64>,
    pub n: usize,
}

/// [`mean`] and [`stderr`] together; `None` for no values.
pub fn estimate(values: &[f64]) -> Option<Estimate> {
    Some(Estimate {
        mean: mean(values)?,
        stderr: stderr(values),
        n: values.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn pass_at_k_hand_values() {
        // n=8, c=2, k=1: c/n.
        assert!(close(pass_at_k(8, 2, 1).unwrap(), 0.25));
        // n=8, c=2, k=8: certain.
        assert_eq!(pass_at_k(8, 2, 8), Some(1.0));
        // n=8, c=0: never.
        assert_eq!(pass_at_k(8, 0, 4), Some(0.0));
        // n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!(close(pass_at_k(5, 2, 2).unwrap(), 0.7));
        // n=10, c=3, k=5: 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!(close(pass_at_k(10, 3, 5).unwrap(), 1.0 - 21.0 / 252.0));
        // n−c < k: 1.
        assert_eq!(pass_at_k(4, 3, 2), Some(1.0));
    }

    #[test]
    fn pass_at_k_is_stable_for_large_n() {
        // C(1000, 500) overflows f64; the product form does not.
        let value = pass_at_k(1000, 1, 500).unwrap();
        assert!(close(value, 0.5));
        assert!(pass_at_k(100_000, 5, 100).unwrap().is_finite());
    }

    #[test]
    fn pass_at_k_rejects_nonsense() {
        assert_eq!(pass_at_k(8, 2, 0), None);
        assert_eq!(pass_at_k(8, 2, 9), None);
        assert_eq!(pass_at_k(8, 9, 1), None);
        assert_eq!(pass_at_k(0, 0, 0), None);
    }

    fn completion(answer: &str) -> String {
        format!("<think>\nx\n</think>\n<answer>{answer}</answer>")
    }

    #[test]
    fn majority_vote_picks_the_most_common_answer() {
        let samples = [
            completion("5"),
            completion("7"),
            completion("7"),
            completion("5"),
            completion("7"),
        ];
        let vote = majority_vote("arithmetic", "7", &samples, false);
        assert_eq!(vote.answer.as_deref(), Some("7"));
        assert_eq!(vote.votes, 3);
        assert!(vote.correct);
        assert!(!majority_vote("arithmetic", "5", &samples, false).correct);
    }

    #[test]
    fn majority_vote_breaks_ties_by_first_appearance() {
        let samples = [
            completion("9"),
            completion("7"),
            completion("7"),
            completion(" 9 "),
        ];
        let vote = majority_vote("arithmetic", "7", &samples, false);
        assert_eq!(vote.answer.as_deref(), Some("9"));
        assert_eq!(vote.votes, 2);
        assert!(!vote.correct);
    }

    #[test]
    fn majority_vote_ignores_unanswered_and_handles_empty() {
        let samples = ["", "no digits here", "13", "<answer>12</answer>"];
        let vote = majority_vote("arithmetic", "12", &samples, false);
        assert_eq!(vote.answer.as_deref(), Some("12"));
        assert!(vote.correct);
        let none: [&str; 0] = [];
        let vote = majority_vote("arithmetic", "12", &none, false);
        assert_eq!(
            vote,
            MajorityVote {
                answer: None,
                votes: 0,
                correct: false
            }
        );
    }

    #[test]
    fn majority_vote_counts_values_not_spellings() {
        // "1,234", "1234" and "x = 1234" are one answer with three votes, beating two "99".
        let samples = [
            completion("99"),
            completion("1,234"),
            completion("1234"),
            completion("99"),
            completion("x = 1234"),
        ];
        let vote = majority_vote("arithmetic", "1234", &samples, false);
        assert_eq!(
            (vote.answer.as_deref(), vote.votes, vote.correct),
            (Some("1,234"), 3, true)
        );
        // Countdown expressions vote by value; the most common spelling represents them.
        let samples = [
            completion("5*7-3"),
            completion("4*9"),
            completion("7*5-3"),
            completion("7*5-3"),
            completion("4*9"),
        ];
        let vote = majority_vote("countdown", "5*7-3", &samples, false);
        assert_eq!(
            (vote.answer.as_deref(), vote.votes, vote.correct),
            (Some("7*5-3"), 3, true)
        );
        // Untagged answers vote only with the fallback.
        let samples = ["the answer is 7", "7", "<answer>8</answer>"];
        assert_eq!(
            majority_vote("arithmetic", "7", &samples, false)
                .answer
                .as_deref(),
            Some("8")
        );
        assert!(majority_vote("arithmetic", "7", &samples, true).correct);
    }

    #[test]
    fn at_n_sizes_double_up_to_k() {
        assert_eq!(at_n_sizes(1), [1]);
        assert_eq!(at_n_sizes(8), [1, 2, 4, 8]);
        assert_eq!(at_n_sizes(6), [1, 2, 4, 6]);
    }

    #[test]
    fn best_of_n_follows_the_prm_and_majority_the_votes() {
        use dagrun_model::prm::{Aggregate, aggregate};
        let samples = [
            completion("5"),
            completion("7"),
            completion("5"),
            completion("7"),
        ];
        let scores: Vec<_> = [0.1, 0.9, 0.2, 0.3]
            .iter()
            .map(|&s| aggregate(&[s], Aggregate::Min))
            .collect();
        // N = 1: sample 0 (wrong); N = 2 and 4: the PRM picks sample 1 (right). Majority:
        // N = 1 "5"; N = 2 a tie, first seen "5"; N = 4 a tie again, "5".
        let (majority, best) = at_n("arithmetic", "7", &samples, Some(&scores), 4, false);
        assert_eq!((majority, best), (vec![false; 3], vec![false, true, true]));
        let (majority, best) = at_n("arithmetic", "5", &samples, None, 4, false);
        assert_eq!((majority, best), (vec![true; 3], vec![]));
    }

    /// What `eval` relies on to leave unscored the problems whose samples all verify alike:
    /// then every pick, by any scores or none, has the same verdict.
    #[test]
    fn when_every_sample_verifies_alike_the_scores_do_not_matter() {
        use dagrun_model::prm::{Aggregate, aggregate};
        // All wrong (two different wrong answers), then all right (written two ways).
        for (answer, samples) in [
            (
                "7",
                [
                    completion("5"),
                    completion("6"),
                    completion("5"),
                    completion("6"),
                ],
            ),
            (
                "1234",
                [
                    completion("1234"),
                    completion("1,234"),
                    completion("1234"),
                    completion("1234"),
                ],
            ),
        ] {
            let unscored = at_n(
                "arithmetic",
                answer,
                &samples,
                Some(&[None, None, None, None]),
                4,
                false,
            );
            for order in [[0.1, 0.9, 0.2, 0.3], [0.9, 0.1, 0.3, 0.2]] {
                let scores: Vec<_> = order
                    .iter()
                    .map(|&s| aggregate(&[s], Aggregate::Min))
                    .collect();
                assert_eq!(
                    at_n("arithmetic", answer, &samples, Some(&scores), 4, false),
                    unscored
                );
            }
        }
    }

    #[test]
    fn mean_and_stderr_hand_values() {
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[1.0, 2.0, 3.0, 4.0]), Some(2.5));
        assert_eq!(stderr(&[1.0]), None);
        // Values 1,2,3,4: sample variance 5/3, stderr sqrt(5/3/4).
        assert!(close(
            stderr(&[1.0, 2.0, 3.0, 4.0]).unwrap(),
            (5.0f64 / 12.0).sqrt()
        ));
        // 0/1 outcomes, p = 0.5 over 4: sqrt(p(1−p)/(n−1)).
        assert!(close(
            stderr(&[0.0, 1.0, 0.0, 1.0]).unwrap(),
            (0.25f64 / 3.0).sqrt()
        ));
        let estimate = estimate(&[3.0]).unwrap();
        assert_eq!((estimate.mean, estimate.stderr, estimate.n), (3.0, None, 1));
    }
}
