//! Near-duplicate removal for rejection sampling: character n-gram Jaccard similarity and an
//! MMR-style greedy pick of good, mutually different completions.
//!
//! Maximal Marginal Relevance (Carbonell & Goldstein, 1998) picks, one at a time, the
//! candidate with the best `lambda·reward − (1−lambda)·(max similarity to those already
//! picked)`. Here the first pick is simply the best reward, and candidates more similar than
//! `max_similarity` to something already picked are dropped as near-duplicates.

use std::collections::HashSet;

/// The distinct character n-grams of `text`, as string slices. A non-empty text shorter
/// than `n` characters counts as one n-gram (itself), so short texts still compare; the
/// empty text has none.
pub fn char_ngrams(text: &str, n: usize) -> HashSet<&str> {
    let n = n.max(1);
    // Byte offsets of every char boundary, including the end, so windows slice cleanly.
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(offset, _)| offset)
        .chain(std::iter::once(text.len()))
        .collect();
    let chars = bounds.len() - 1;
    if chars == 0 {
        return HashSet::new();
    }
    if chars < n {
        return HashSet::from([text]);
    }
    (0..=chars - n)
        .map(|start| &text[bounds[start]..bounds[start + n]])
        .collect()
}

/// Jaccard similarity `|A∩B| / |A∪B|` of two n-gram sets; 1.0 when both are empty (two
/// empty texts are the same text).
pub fn jaccard_sets(a: &HashSet<&str>, b: &HashSet<&str>) -> f64 {
    let union = a.len() + b.len();
    if union == 0 {
        return 1.0;
    }
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let shared = small.iter().filter(|gram| large.contains(*gram)).count();
    shared as f64 / (union - shared) as f64
}

/// Character n-gram Jaccard similarity of two texts, in `[0, 1]`.
pub fn jaccard(a: &str, b: &str, n: usize) -> f64 {
    jaccard_sets(&char_ngrams(a, n), &char_ngrams(b, n))
}

/// How [`select_diverse`] trades reward against novelty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diversity {
    /// At most this many picks.
    pub k: usize,
    /// Weight of reward against similarity: 1.0 ranks by reward alone (still dropping
    /// near-duplicates), 0.0 by novelty alone. Rewards are used as given, so they should be
    /// on a scale comparable to similarity's `[0, 1]`, as this project's rewards are.
    pub lambda: f64,
    /// A candidate more similar than this to any pick is a near-duplicate and never picked.
    pub max_similarity: f64,
    /// Character n-gram size for [`jaccard`].
    pub ngram_size: usize,
}

impl Default for Diversity {
    fn default() -> Self {
        Self {
            k: 4,
            lambda: 0.7,
            max_similarity: 0.9,
            ngram_size: 5,
        }
    }
}

/// Indices of up to `k` candidates `(text, reward)`, in pick order: the best reward first,
/// then each time the candidate maximising `lambda·reward − (1−lambda)·max_sim_to_picked`
/// among those not above `max_similarity` to any pick. Ties go to the lower index, so the
/// result is deterministic. Candidates with a non-finite reward are never picked.
pub fn select_diverse<S: AsRef<str>>(candidates: &[(S, f64)], diversity: &Diversity) -> Vec<usize> {
    let grams: Vec<HashSet<&str>> = candidates
        .iter()
        .map(|(text, _)| char_ngrams(text.as_ref(), diversity.ngram_size))
        .collect();
    // Remaining candidates with their highest similarity to any pick so far.
    let mut open: Vec<(usize, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, reward))| reward.is_finite())
        .map(|(index, _)| (index, 0.0))
        .collect();
    let mut picked = Vec::new();
    while picked.len() < diversity.k && !open.is_empty() {
        let score = |&(index, max_sim): &(usize, f64)| {
            let reward = candidates[index].1;
            if picked.is_empty() {
                reward
            } else {
                diversity.lambda * reward - (1.0 - diversity.lambda) * max_sim
            }
        };
        // First maximum wins ties: `open` stays in index order.
        let mut best = 0;
        for slot in 1..open.len() {
            if score(&open[slot]) > score(&open[best]) {
                best = slot;
            }
        }
        let (chosen, _) = open.remove(best);
        picked.push(chosen);
        for (index, max_sim) in &mut open {
            *max_sim = max_sim.max(jaccard_sets(&grams[*index], &grams[chosen]));
        }
        open.retain(|&(_, max_sim)| max_sim <= diversity.max_similarity);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn ngrams_and_jaccard_hand_values() {
        assert_eq!(char_ngrams("abcd", 2), HashSet::from(["ab", "bc", "cd"]));
        assert_eq!(char_ngrams("aaaa", 2), HashSet::from(["aa"]));
        assert_eq!(char_ngrams("ab", 3), HashSet::from(["ab"]));
        assert!(char_ngrams("", 3).is_empty());
        // Multi-byte characters slice on char boundaries.
        assert_eq!(char_ngrams("é−x", 2), HashSet::from(["é−", "−x"]));
        // {ab,bc,cd} vs {bc,cd,de}: 2 shared of 4.
        assert!(close(jaccard("abcd", "bcde", 2), 0.5));
        assert!(close(jaccard("abc", "abc", 2), 1.0));
        assert!(close(jaccard("abc", "xyz", 2), 0.0));
        assert!(close(jaccard("", "", 3), 1.0));
        assert!(close(jaccard("", "abc", 3), 0.0));
        assert!(close(jaccard("ab", "ab", 5), 1.0));
        assert!(close(jaccard("ab", "ba", 5), 0.0));
    }

    #[test]
    fn best_reward_first_then_diverse() {
        let candidates = [
            ("aaaa bbbb", 0.9),
            ("aaaa bbbc", 1.0), // best reward
            ("xxxx yyyy", 0.5),
            ("aaaa bbbb", 0.95),
        ];
        let diversity = Diversity {
            k: 3,
            lambda: 0.5,
            max_similarity: 0.95,
            ngram_size: 3,
        };
        // #1 first (best reward). #0 and #3 are 5/6 similar to it, so the unrelated #2 comes
        // next; then #3 (higher reward than its identical twin #0), after which #0 is a
        // duplicate (similarity 1 > 0.95) and dropped.
        assert_eq!(select_diverse(&candidates, &diversity), vec![1, 2, 3]);
    }

    #[test]
    fn near_duplicates_are_dropped() {
        let candidates = [
            ("same text here", 1.0),
            ("same text here", 1.0),
            ("same text here!", 0.9),
        ];
        let diversity = Diversity {
            k: 10,
            lambda: 1.0,
            max_similarity: 0.8,
            ngram_size: 3,
        };
        assert_eq!(select_diverse(&candidates, &diversity), vec![0]);
        let loose = Diversity {
            max_similarity: 1.0,
            ..diversity
        };
        assert_eq!(select_diverse(&candidates, &loose), vec![0, 1, 2]);
    }

    #[test]
    fn lambda_one_ranks_by_reward_lambda_zero_by_novelty() {
        let candidates = [("abcdef", 1.0), ("abcdeg", 0.9), ("uvwxyz", 0.1)];
        let by_reward = Diversity {
            k: 3,
            lambda: 1.0,
            max_similarity: 1.0,
            ngram_size: 2,
        };
        assert_eq!(select_diverse(&candidates, &by_reward), vec![0, 1, 2]);
        let by_novelty = Diversity {
            lambda: 0.0,
            ..by_reward
        };
        assert_eq!(select_diverse(&candidates, &by_novelty), vec![0, 2, 1]);
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let none: [(&str, f64); 0] = [];
        assert!(select_diverse(&none, &Diversity::default()).is_empty());
        let zero_k = Diversity {
            k: 0,
            ..Diversity::default()
        };
        assert!(select_diverse(&[("a", 1.0)], &zero_k).is_empty());
        let candidates = [
            ("a", f64::NAN),
            ("b", f64::NEG_INFINITY),
            ("", 0.0),
            ("", 0.0),
        ];
        // Non-finite rewards are never picked; the two empty texts are duplicates.
        assert_eq!(select_diverse(&candidates, &Diversity::default()), vec![2]);
        // Ties go to the lower index.
        let tied = [("abc", 0.5), ("xyz", 0.5)];
        assert_eq!(select_diverse(&tied, &Diversity::default()), vec![0, 1]);
    }
}
