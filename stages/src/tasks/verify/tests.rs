use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn answered(answer: &str) -> String {
    format!("<think>\nwork\n</think>\n<answer>{answer}</answer>")
}

#[test]
fn extracts_from_the_last_answer_block() {
    assert_eq!(
        extract_answer("arithmetic", &answered(" 741 ")),
        Some("741".into())
    );
    assert_eq!(
        extract_answer("arithmetic", "<answer>1</answer> then <answer>2</answer>"),
        Some("2".into())
    );
    assert_eq!(extract_answer("arithmetic", "<answer> </answer> 5"), None);
    assert_eq!(
        extract_answer("countdown", &answered("5*7-3")),
        Some("5*7-3".into())
    );
}

#[test]
fn falls_back_to_the_last_number_only_when_asked() {
    let fallback = |task, text| extract_answer_with(task, text, true);
    assert_eq!(
        fallback("arithmetic", "7+5=12 so the total is 1,234."),
        Some("1234".into())
    );
    assert_eq!(fallback("linear", "so x = -5"), Some("-5".into()));
    assert_eq!(fallback("linear", "x=-5"), Some("-5".into()));
    assert_eq!(fallback("arithmetic", "10-5"), Some("5".into()));
    assert_eq!(
        fallback("word", "it costs 2.50 dollars"),
        Some("2.50".into())
    );
    assert_eq!(
        fallback("word", "<answer>7 (unterminated"),
        Some("7".into())
    );
    assert_eq!(fallback("word", "no numbers here"), None);
    assert_eq!(fallback("word", ""), None);
    // By default an untagged or truncated response has no answer.
    for text in [
        "the total is 1,234.",
        "x=-5",
        "<answer>7 (unterminated",
        "<think>\n3+4=7\n",
    ] {
        assert_eq!(extract_answer("arithmetic", text), None, "{text:?}");
    }
    assert_eq!(
        extract_answer("arithmetic", "x <answer> 7 </answer>"),
        Some("7".into())
    );
}

#[test]
fn falls_back_to_the_last_expression_for_countdown() {
    let fallback = |text| extract_answer_with("countdown", text, true);
    assert_eq!(fallback("5*7=35\n35-3=32\n5*7-3=32"), Some("5*7-3".into()));
    assert_eq!(fallback("use (9-4)*3 here"), Some("(9-4)*3".into()));
    assert_eq!(fallback("just 15"), Some("15".into()));
    assert_eq!(fallback("nothing"), None);
    assert_eq!(
        extract_answer("countdown", "5*7=35\n35-3=32\n5*7-3=32"),
        None
    );
}

#[test]
fn numeric_answers_compare_as_numbers() {
    for good in [
        "741",
        " 741 ",
        "+741",
        "x=741",
        "x = 741",
        "0741",
        "741.0",
        "741.",
        "741 dollars",
        "X=741",
    ] {
        assert!(verify("arithmetic", "741", &answered(good)), "{good:?}");
    }
    for bad in [
        "742",
        "-741",
        "74.1",
        "741 or 742",
        "7,41",
        "",
        "x=",
        "seven hundred",
    ] {
        assert!(!verify("arithmetic", "741", &answered(bad)), "{bad:?}");
    }
    assert!(
        verify("linear", "-5", &answered("x=−5")),
        "typographic minus"
    );
    assert!(verify("linear", "0", &answered("-0")));
    assert!(verify("word", "1234567", &answered("1,234,567")));
    assert!(!verify("word", "1234567", &answered("1234,567,")));
    assert!(
        !verify("word", "26", "I think the answer is 26."),
        "no tags: no answer"
    );
    assert!(
        verify_with("word", "26", "I think the answer is 26.", true),
        "no tags, with the fallback: last number"
    );
    assert!(!verify("word", "26", "<think>\n20+6=26\n"), "truncated");
    let huge = "123456789012345678901234567890123456789012345678901234567890";
    assert!(verify("arithmetic", huge, &answered(huge)));
    assert!(!verify("arithmetic", huge, &answered(&format!("{huge}1"))));
}

#[test]
fn non_numeric_references_compare_as_text() {
    assert!(verify("other", "yes", &answered(" yes ")));
    assert!(!verify("other", "yes", &answered("no")));
}

#[test]
fn countdown_answers_are_evaluated() {
    assert!(verify("countdown", "5*7-3", &answered("7*5-3")));
    assert!(verify("countdown", "5*7-3", &answered("5 × 7 − 3 = 32")));
    assert!(verify("countdown", "5*7-3", &answered("it is 5*7-3")));
    assert!(!verify(
        "countdown",
        "5*7-3",
        "so 35-3=32, that is 7*5-3=32"
    ));
    assert!(verify_with(
        "countdown",
        "5*7-3",
        "so 35-3=32, that is 7*5-3=32",
        true
    ));
    assert!(!verify("countdown", "5*7-3", &answered("32")));
    assert!(
        !verify("countdown", "5*7-3", &answered("3+5 or 5*7-3")),
        "hedging is wrong"
    );
    assert!(!verify("countdown", "5*7-3", &answered("5*7-3*1")));
}

#[test]
fn format_requires_think_then_answer() {
    assert!(has_format("<think>\nsteps\n</think>\n<answer>5</answer>"));
    assert!(has_format("  <think></think><answer>5</answer>\n"));
    for bad in [
        "",
        "<answer>5</answer>",
        "<think>x</think>",
        "<think>x</think>\n<answer></answer>",
        "<think>x</think>\n<answer>5</answer> trailing",
        "leading <think>x</think>\n<answer>5</answer>",
        "<think>x</think> gap <answer>5</answer>",
        "<think>a<think>b</think><answer>5</answer>",
        "<think>x</think><answer>5</answer><answer>6</answer>",
        "<answer>5</answer><think>x</think>",
        "<think>x</think><answer>5",
    ] {
        assert!(!has_format(bad), "{bad:?}");
    }
}

#[test]
fn canonical_answers_are_values() {
    for (text, want) in [
        ("1,234", "1234"),
        ("1234", "1234"),
        ("1234.0", "1234"),
        ("x = 5", "5"),
        ("5", "5"),
        ("+5", "5"),
        ("26 dollars", "26"),
        ("-0", "0"),
    ] {
        assert_eq!(
            canonical_answer("arithmetic", text).as_deref(),
            Some(want),
            "{text:?}"
        );
    }
    for text in ["", "5 or 6", "five", "1,23"] {
        assert_eq!(canonical_answer("word", text), None, "{text:?}");
    }
    for (text, want) in [
        ("5*7-3", "32"),
        ("7*5-3", "32"),
        ("32", "32"),
        ("5 × 7 − 3 = 32", "32"),
        ("it is (9-4)*3", "15"),
    ] {
        assert_eq!(
            canonical_answer("countdown", text).as_deref(),
            Some(want),
            "{text:?}"
        );
    }
    assert_eq!(canonical_answer("countdown", "3+5 or 5*7-3"), None);
    assert_eq!(
        canonical_answer("countdown", "7/2"),
        None,
        "inexact division"
    );
}

#[test]
fn reasoning_results_follow_the_worked_solutions() {
    let think = |lines: &str| format!("<think>\n{lines}\n</think>\n<answer>0</answer>");
    let column = "7+5+9=21 write 1 carry 2\n4+8+0+2=14 write 4 carry 1\n3+2+1+1=7 write 7";
    assert_eq!(reasoning_result(&think(column)).as_deref(), Some("741"));
    let borrowing = "15-8=7 write 7 borrow 1\n10-9-1=0 write 0 borrow 1\n1-0-1=0 write 0";
    assert_eq!(reasoning_result(&think(borrowing)).as_deref(), Some("007"));
    assert_eq!(
        reasoning_result(&think("3x=22-7=15\nx=15/3=5")).as_deref(),
        Some("5")
    );
    assert_eq!(
        reasoning_result(&think("x=-15/3=-5")).as_deref(),
        Some("-5")
    );
    assert_eq!(
        reasoning_result(&think("5*7=35\n35-3=32\n5*7-3=32")).as_deref(),
        Some("32")
    );
    assert_eq!(
        reasoning_result(&think("3*4=12\nso the total is\n")).as_deref(),
        Some("12")
    );
    assert_eq!(reasoning_result(&think("no equations")), None);
    assert_eq!(reasoning_result("<think>\n3+4=7\n"), None, "unclosed");
}

#[test]
fn never_panics_on_arbitrary_input() {
    let pieces = [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<answer",
        "answer>",
        "0",
        "7",
        "99999999999999999999999999",
        "-",
        "+",
        "*",
        "/",
        "(",
        ")",
        "=",
        ".",
        ",",
        "x",
        " ",
        "\n",
        "é",
        "数",
        "🦀",
        "\u{2212}",
        "×",
        "÷",
        "1,000",
        "\u{0}",
        "ß",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let tasks = ["arithmetic", "linear", "word", "countdown", "", "??"];
    let references = [
        "741",
        "-5",
        "5*7-3",
        "(9-4)*3",
        "",
        "garbage",
        "99999999999999999999999999",
    ];
    for _ in 0..20_000 {
        let length = rng.random_range(0..40);
        let mut text: String = (0..length)
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        if rng.random_bool(0.2) {
            text.extend((0..rng.random_range(0..20)).map(|_| rng.random::<char>()));
        }
        let task = tasks[rng.random_range(0..tasks.len())];
        let reference = references[rng.random_range(0..references.len())];
        let _ = extract_answer_with(task, &text, true);
        let _ = canonical_answer(task, &text);
        let _ = reasoning_result(&text);
        let _ = has_format(&text);
        let _ = verify(task, reference, &text);
        let _ = verify_with(task, &text, &text, true);
    }
    let long = "(".repeat(100_000) + &"9".repeat(100_000);
    for task in tasks {
        assert!(!verify_with(task, "1", &long, true));
        assert!(!verify(task, &long, "1"));
        let _ = canonical_answer(task, &long);
    }
}

/// (completion, reference, verdict) for answers as real datasets write them. A completion
/// without `<` is the content of an `<answer>` block after a short think block; one with
/// `<` is the whole completion. Judged by `verify` (no fallback) for an unknown task.
const CASES: &[(&str, &str, bool)] = &[
    // Plain integers, as the synthetic tasks and GSM8K write them.
    ("923", "923", true),
    ("0923", "923", true),
    ("923.0", "923", true),
    ("+923", "923", true),
    ("924", "923", false),
    // Thousands separators, also LaTeX's; nonsense separators are not numbers.
    ("1,234", "1234", true),
    ("1234", "1,234", true),
    ("1{,}234", "1234", true),
    ("10\\,000", "10000", true),
    ("1,234,567", "1234567", true),
    ("1,2", "12", false),
    ("12", "1,2", false),
    ("1,23,4", "1234", false),
    ("7 41", "741", false),
    // Decimals are exact.
    ("0.5", "0.5", true),
    (".5", "0.5", true),
    ("0.50", "0.5", true),
    ("1,234.5", "1234.50", true),
    ("0.05", "0.5", false),
    // Fractions equal decimals exactly, never approximately.
    ("\\frac{1}{2}", "0.5", true),
    ("1/2", "\\frac{1}{2}", true),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", true),
    ("\\tfrac34", "0.75", true),
    ("\\frac{6}{8}", "\\frac{3}{4}", true),
    ("2\\frac{1}{2}", "2.5", true),
    ("5/2", "2\\frac12", true),
    ("\\frac{1}{3}", "1/3", true),
    ("0.333", "\\frac13", false),
    ("0.3333333333", "\\frac{1}{3}", false),
    ("\\frac{2}{3}", "\\frac{3}{2}", false),
    // Percentages: `50%` equals `50` and `0.5`; a bare `50` does not equal `0.5`.
    ("50\\%", "50\\%", true),
    ("50%", "50", true),
    ("50", "50\\%", true),
    ("0.5", "50\\%", true),
    ("50 percent", "0.5", true),
    ("50", "0.5", false),
    ("0.5%", "50\\%", false),
    ("5%", "50%", false),
    // Signs.
    ("-3", "-3", true),
    ("\u{2212}3", "-3", true),
    ("$-3$", "-3", true),
    ("(-3)", "-3", true),
    ("-\\frac{3}{4}", "-0.75", true),
    ("\\frac{-3}{4}", "-\\frac{3}{4}", true),
    ("3", "-3", false),
    ("-3", "3", false),
    // LaTeX wrappers, currency and units.
    ("\\boxed{42}", "42", true),
    ("$\\boxed{42}$", "42", true),
    (
        "The final answer is $\\boxed{\\frac{3}{4}}$.",
        "\\boxed{\\frac{3}{4}}",
        true,
    ),
    ("\\text{12 cm}", "12", true),
    ("12 cm", "\\text{12 cm}", true),
    ("12cm", "12", true),
    ("12 \\text{ cm}^2", "12", true),
    ("\\$18", "18", true),
    ("$18.00", "\\$18", true),
    ("18 dollars", "\\$18", true),
    ("90^\\circ", "90", true),
    ("\\left(7\\right)", "7", true),
    ("x = 5", "5", true),
    ("5", "x = 5", true),
    ("the answer is 5.", "5", true),
    ("5 (the total)", "5", true),
    // Simple expressions equal in value.
    ("2+3", "5", true),
    ("5", "2+3", true),
    ("2^{10}", "1024", true),
    ("5 \\times 10^3", "5000", true),
    ("3 \\cdot 4", "12", true),
    ("(1+2)*3", "9", true),
    ("2+3 = 5", "5", true),
    ("2+3 = 6", "6", false),
    ("1/0", "0", false),
    ("2^99999", "0", false),
    // Hedging between answers.
    ("3 or 4", "3", false),
    ("3, 4", "3", false),
    ("x = 3 or x = 4", "4", false),
    ("\\boxed{3} or \\boxed{4}", "4", false),
    ("3 = 4", "4", false),
    // Formulas are not the number in them.
    ("2x", "2", false),
    ("2\\pi", "2", false),
    ("\\sqrt{2}", "2", false),
    ("x + 5", "5", false),
    ("5!", "5", false),
    ("5(x)", "5", false),
    ("x < 5", "5", false),
    // Truncated or missing answers.
    ("\\boxed{12", "12", false),
    ("\\frac{1}{", "0.5", false),
    ("<think>\n6*2=12\n</think>\nso it is 12", "12", false),
    ("<think>\n6*2=12\n", "12", false),
    ("<think>\n6*2=12\n</think>\n<answer>12", "12", false),
    ("", "12", false),
    // GSM8K references end in `#### answer`; big numbers compare as text.
    (
        "72",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
        true,
    ),
    ("#### 72", "72", true),
    ("71", "So 48+24 = 72.\n#### 72", false),
    (
        "123,456,789,012,345,678,901,234,567,890,123,456",
        "123456789012345678901234567890123456",
        true,
    ),
    (
        "123456789012345678901234567890123456789012345678901234567890",
        "123456789012345678901234567890123456789012345678901234567891",
        false,
    ),
    // Multiple choice: a reference that is one option letter.
    ("B", "B", true),
    ("(B)", "B", true),
    ("B)", "(B)", true),
    ("b", "B", true),
    ("The answer is B", "B", true),
    ("\\text{(B)}", "B", true),
    ("\\boxed{B}", "(B)", true),
    ("(B) 12", "B", true),
    ("C", "B", false),
    ("B or C", "B", false),
    ("12", "B", false),
    // References that state no number compare as text.
    ("\\text{Evelyn}", "\\text{Evelyn}", true),
    ("Evelyn", "\\text{Evelyn}", true),
    ("\\sqrt{2}", "\\sqrt{2}", true),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", true),
    ("\\sqrt{3}", "\\sqrt{2}", false),
];

#[test]
fn real_answers_verify_by_value() {
    assert!(CASES.len() >= 60);
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|&(completion, reference, expected)| {
            let completion = if completion.contains('<') {
                completion.to_owned()
            } else {
                answered(completion)
            };
            let got = verify("math", reference, &completion);
            (got != expected)
                .then(|| format!("{completion:?} vs {reference:?}: {got}, want {expected}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_fallback_reads_a_final_box_and_never_a_truncated_one() {
    let fallback = |reference, completion| verify_with("math", reference, completion, true);
    assert!(fallback("12", "so the answer is $\\boxed{12}$."));
    assert!(fallback("0.75", "6/8 reduces, so \\boxed{\\frac{3}{4}}"));
    assert!(!fallback("12", "so 6*2 = 12, the answer is \\boxed{12"));
    assert!(!fallback("4", "\\boxed{3} or maybe \\boxed{4}"));
    assert!(fallback("26", "I think the answer is 26."));
    assert_eq!(
        extract_answer_with("math", "thus \\boxed{ \\frac{3}{4} } ok", true),
        Some("\\frac{3}{4}".into())
    );
    assert_eq!(extract_answer_with("math", "\\boxed{}", true), None);
    assert!(
        !verify("math", "12", "so the answer is \\boxed{12}"),
        "without the fallback a box outside an answer block is not read"
    );
}

#[test]
fn canonical_answers_of_real_answers() {
    for (text, want) in [
        ("\\frac{1}{2}", "1/2"),
        ("0.5", "1/2"),
        ("2.50", "5/2"),
        ("\\boxed{-3}", "-3"),
        ("50\\%", "50%"),
        ("\\$1{,}000", "1000"),
        ("(B)", "(B)"),
        ("the answer is B", "(B)"),
    ] {
        assert_eq!(
            canonical_answer("math", text).as_deref(),
            Some(want),
            "{text:?}"
        );
    }
    for text in ["3 or 4", "\\boxed{3", "1/0", "B or C"] {
        assert_eq!(canonical_answer("math", text), None, "{text:?}");
    }
}

#[test]
fn weird_inputs_give_verdicts_not_panics() {
    let huge = "9".repeat(100_000);
    assert!(
        verify("math", &huge, &answered(&huge)),
        "numerals of any length"
    );
    assert!(!verify("math", &huge, &answered(&format!("{huge}9"))));
    let nested = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let fracs = format!("{}1{}", "\\frac{".repeat(10_000), "}{2}".repeat(10_000));
    let texts = format!("{}1{}", "\\text{".repeat(10_000), "}".repeat(10_000));
    let weird = [
        String::new(),
        huge.clone(),
        "1/0".into(),
        "0^0".into(),
        "2^99999".into(),
        "2^2^2^2^2^2^2^2".into(),
        format!("2{}", "^2".repeat(5_000)),
        "-".repeat(100_000) + "1",
        nested,
        fracs,
        texts,
        "{".repeat(100_000),
        "\\boxed{".repeat(10_000),
        "\\".repeat(10_001),
        "####".repeat(1_000),
        "=".repeat(10_000) + "5",
        " ".repeat(100_000) + "\\frac12",
        "½ ٣ 三 ⅓ 𝟙 ①".into(),
        "é数🦀\u{0}\u{2212}\u{202f}²³°".into(),
        "1,".repeat(10_000),
        ".".repeat(10_000) + "5",
        "%".repeat(1_000) + "5",
    ];
    for text in &weird {
        for task in ["math", "countdown", "arithmetic"] {
            let _ = verify_with(task, "5", &answered(text), true);
            let _ = verify_with(task, text, &answered("5"), true);
            let _ = verify_with(task, text, text, true);
            let _ = canonical_answer(task, text);
        }
    }
    assert!(!verify("math", "0", &answered("1/0")));
    assert!(!verify("math", "1", &answered("2^99999/2^99999")));
}

#[test]
fn random_latex_never_panics() {
    let pieces = [
        "\\frac",
        "\\dfrac",
        "\\boxed",
        "\\text",
        "\\left",
        "\\right",
        "\\%",
        "\\$",
        "\\,",
        "\\",
        "{",
        "}",
        "(",
        ")",
        "{,}",
        "^",
        "^\\circ",
        "$",
        "####",
        "=",
        "%",
        "-",
        "+",
        "*",
        "/",
        ".",
        ",",
        " ",
        "\n",
        "0",
        "1",
        "2",
        "9",
        "12",
        "999999999999999999999",
        "x",
        "B",
        "(B)",
        "or",
        "cm",
        "pi",
        "!",
        "é",
        "数",
        "🦀",
        "\u{2212}",
        "\u{2009}",
        "²",
        "<answer>",
        "</answer>",
        "<think>",
        "</think>",
    ];
    let references = [
        "5",
        "0.5",
        "\\frac{1}{2}",
        "50\\%",
        "B",
        "x = 5",
        "\\sqrt{2}",
        "#### 7",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for _ in 0..20_000 {
        let text: String = (0..rng.random_range(0..30))
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        let reference = references[rng.random_range(0..references.len())];
        let _ = verify("math", reference, &answered(&text));
        let _ = verify_with("math", &text, &text, true);
        let _ = canonical_answer("math", &text);
        let _ = extract_answer_with("math", &text, true);
    }
}
