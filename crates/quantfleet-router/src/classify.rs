//! Task-class classification, following a PrecisionPolicy's classifier: the explicit header first, then the
//! body's `metadata.task_class`, then the ordered rules (the policy's, or the built-in order when it lists
//! none); a request no rule matches is chat. The decision carries the rule that made it, for the response
//! header and the metrics.

use crate::error::ApiError;
use quantfleet_api::{ClassifierRule, ClassifierSpec, RuleCondition, TaskClass};

/// What decided a request's class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    Header,
    Metadata,
    /// The rule at this index (0-based) of the effective rule list, and what it tests.
    Rule(usize, RuleCondition),
    /// No rule matched.
    Default,
}

impl DecidedBy {
    /// A bounded label: `header`, `metadata`, `default`, or the rule's condition (e.g. `code-markers`).
    pub fn label(&self) -> &'static str {
        match self {
            DecidedBy::Header => "header",
            DecidedBy::Metadata => "metadata",
            DecidedBy::Default => "default",
            DecidedBy::Rule(_, c) => condition_name(*c),
        }
    }
    /// The response header value: the label, with the rule's position when a rule decided (`rule[1]:code-markers`).
    pub fn header_value(&self) -> String {
        match self {
            DecidedBy::Rule(i, c) => format!("rule[{i}]:{}", condition_name(*c)),
            other => other.label().to_owned(),
        }
    }
}

fn condition_name(c: RuleCondition) -> &'static str {
    match c {
        RuleCondition::ToolsOrJsonSchema => "tools-or-json-schema",
        RuleCondition::CodeMarkers => "code-markers",
        RuleCondition::MathMarkers => "math-markers",
        RuleCondition::PromptTokensOver => "prompt-tokens-over",
        RuleCondition::Keywords => "keywords",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub class: TaskClass,
    pub by: DecidedBy,
}

/// What the classifier looks at in a request.
pub struct Features<'a> {
    pub header: Option<&'a str>,
    pub metadata_class: Option<&'a str>,
    pub structured: bool,
    pub text: &'a str,
    /// Counts the prompt's tokens; only called when a length rule is reached.
    pub prompt_tokens: &'a dyn Fn() -> usize,
}

/// A compiled classifier.
#[derive(Clone, Debug)]
pub struct Classifier {
    pub header: String,
    rules: Vec<ClassifierRule>,
}

impl Classifier {
    pub fn new(spec: &ClassifierSpec) -> Self {
        let rules = if spec.rules.is_empty() {
            let rule = |when, task_class| ClassifierRule { when, task_class, prompt_tokens_over: None, keywords: None };
            vec![
                rule(RuleCondition::ToolsOrJsonSchema, TaskClass::Agent),
                rule(RuleCondition::CodeMarkers, TaskClass::Code),
                rule(RuleCondition::MathMarkers, TaskClass::Math),
                ClassifierRule {
                    prompt_tokens_over: Some(spec.long_context_tokens),
                    ..rule(RuleCondition::PromptTokensOver, TaskClass::LongContext)
                },
            ]
        } else {
            spec.rules.clone()
        };
        Classifier { header: spec.header.to_ascii_lowercase(), rules }
    }

    pub fn classify(&self, f: &Features<'_>) -> Result<Decision, ApiError> {
        let explicit = |value: &str, what: &str, by| {
            value.trim().parse::<TaskClass>().map(|class| Decision { class, by }).map_err(|e| {
                ApiError::invalid(Some(what.to_owned()), format!("{what}: {e}")).with_code("invalid_task_class")
            })
        };
        if let Some(h) = f.header {
            return explicit(h, &self.header, DecidedBy::Header);
        }
        if let Some(m) = f.metadata_class {
            return explicit(m, "metadata.task_class", DecidedBy::Metadata);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let hit = match rule.when {
                RuleCondition::ToolsOrJsonSchema => f.structured,
                RuleCondition::CodeMarkers => has_code_markers(f.text),
                RuleCondition::MathMarkers => has_math_markers(f.text),
                RuleCondition::PromptTokensOver => {
                    rule.prompt_tokens_over.is_some_and(|n| (f.prompt_tokens)() > n.max(0) as usize)
                }
                RuleCondition::Keywords => {
                    let lower = f.text.to_lowercase();
                    rule.keywords.iter().flatten().any(|k| !k.is_empty() && lower.contains(&k.to_lowercase()))
                }
            };
            if hit {
                return Ok(Decision { class: rule.task_class, by: DecidedBy::Rule(i, rule.when) });
            }
        }
        Ok(Decision { class: TaskClass::Chat, by: DecidedBy::Default })
    }
}

/// Code fences, or a line that starts like code in a common language.
pub fn has_code_markers(text: &str) -> bool {
    if text.contains("```") {
        return true;
    }
    // Starts that are code on their own, and starts that are code only with code punctuation on the line
    // ("let me know" is prose, "let x = 1;" is not).
    const STRONG: &[&str] = &[
        "def ",
        "async def ",
        "fn ",
        "pub fn ",
        "#include",
        "function ",
        "func ",
        "package ",
        "public class ",
        "public static ",
        "impl ",
        "#!/",
        "console.log(",
        "printf(",
        "System.out.",
    ];
    const WEAK: &[&str] = &["import ", "const ", "let ", "var ", "private ", "struct ", "return ", "SELECT ", "print("];
    text.lines().map(str::trim).any(|line| {
        STRONG.iter().any(|s| line.starts_with(s) && line.len() > s.len())
            || (WEAK.iter().any(|s| line.starts_with(s)) && line.contains(['=', '(', ';', '{']))
            || (line.starts_with("from ") && line.contains(" import "))
            || (line.starts_with("class ") && line.ends_with(':'))
            || (line.ends_with('{') && line.contains('(') && line.contains(')'))
            || line.ends_with(");")
    })
}

/// LaTeX, arithmetic between numbers, equations, or a word problem (a math verb or question with numbers).
pub fn has_math_markers(text: &str) -> bool {
    const LATEX: &[&str] = &["\\frac", "\\sqrt", "\\sum", "\\int", "\\cdot", "\\times", "$$", "\\(", "\\["];
    if LATEX.iter().any(|m| text.contains(m)) {
        return true;
    }
    let chars: Vec<char> = text.chars().collect();
    // `3 + 4`, `12*7`, `2^10`, `x = 5`: a digit or variable, an operator, then a digit, spaces allowed.
    for (i, &c) in chars.iter().enumerate() {
        if matches!(c, '+' | '*' | '/' | '^' | '=' | '×' | '÷' | '-') {
            let before = chars[..i].iter().rev().find(|c| !c.is_whitespace());
            let after = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            let before_ok = before.is_some_and(|b| b.is_ascii_digit() || (c == '=' && b.is_ascii_alphabetic()));
            let after_ok = after.is_some_and(|a| a.is_ascii_digit());
            // A lone hyphen between digits is usually a range or a date, not subtraction.
            if before_ok && after_ok && (c != '-' || chars.get(i + 1) == Some(&' ')) {
                return true;
            }
        }
    }
    let lower = text.to_lowercase();
    const WORDS: &[&str] = &[
        "solve",
        "equation",
        "integral",
        "derivative",
        "how many",
        "how much",
        "calculate",
        "compute",
        "sum of",
        "product of",
        "percent",
        "remainder",
        "prime",
        "probability",
    ];
    let numbers = lower.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).count();
    numbers >= 1 && WORDS.iter().any(|w| lower.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(c: &Classifier, header: Option<&str>, structured: bool, text: &str, tokens: usize) -> Decision {
        c.classify(&Features { header, metadata_class: None, structured, text, prompt_tokens: &|| tokens }).unwrap()
    }

    #[test]
    fn built_in_rules_in_order() {
        let c = Classifier::new(&ClassifierSpec::default());
        let d = classify(&c, None, true, "```python\nx = 1 + 2\n```", 10);
        assert_eq!((d.class, d.by), (TaskClass::Agent, DecidedBy::Rule(0, RuleCondition::ToolsOrJsonSchema)));
        let d = classify(&c, None, false, "Fix this:\n```rust\nfn main() {}\n```\nWhat is 2 + 2?", 10);
        assert_eq!((d.class, d.by.header_value().as_str()), (TaskClass::Code, "rule[1]:code-markers"));
        let d = classify(&c, None, false, "What is 17 * 23?", 10);
        assert_eq!((d.class, d.by.label()), (TaskClass::Math, "math-markers"));
        let d = classify(&c, None, false, "Summarise this essay.", 5000);
        assert_eq!((d.class, d.by.label()), (TaskClass::LongContext, "prompt-tokens-over"));
        let d = classify(&c, None, false, "Tell me about Paris.", 2048);
        assert_eq!((d.class, d.by), (TaskClass::Chat, DecidedBy::Default), "2048 is not over 2048");
    }

    #[test]
    fn the_header_wins_and_a_bad_one_is_a_400() {
        let c = Classifier::new(&ClassifierSpec::default());
        let d = classify(&c, Some("math"), true, "```code```", 99999);
        assert_eq!((d.class, d.by), (TaskClass::Math, DecidedBy::Header));
        let e = c
            .classify(&Features {
                header: Some("poetry"),
                metadata_class: None,
                structured: false,
                text: "",
                prompt_tokens: &|| 0,
            })
            .unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("long-context"), "lists the accepted names: {}", e.message);
        let d = c
            .classify(&Features {
                header: None,
                metadata_class: Some("code"),
                structured: false,
                text: "",
                prompt_tokens: &|| 0,
            })
            .unwrap();
        assert_eq!((d.class, d.by), (TaskClass::Code, DecidedBy::Metadata));
    }

    #[test]
    fn policy_rules_replace_the_built_in_order() {
        let spec = ClassifierSpec {
            rules: vec![
                ClassifierRule {
                    when: RuleCondition::Keywords,
                    task_class: TaskClass::Math,
                    prompt_tokens_over: None,
                    keywords: Some(vec!["Theorem".into()]),
                },
                ClassifierRule {
                    when: RuleCondition::PromptTokensOver,
                    task_class: TaskClass::LongContext,
                    prompt_tokens_over: Some(100),
                    keywords: None,
                },
            ],
            ..ClassifierSpec::default()
        };
        let c = Classifier::new(&spec);
        assert_eq!(classify(&c, None, false, "prove this theorem", 5).by, DecidedBy::Rule(0, RuleCondition::Keywords));
        assert_eq!(
            classify(&c, None, true, "```x```", 101).class,
            TaskClass::LongContext,
            "no tools rule in this policy"
        );
        assert_eq!(classify(&c, None, true, "```x```", 100).class, TaskClass::Chat);
    }

    #[test]
    fn the_token_count_is_only_taken_when_needed() {
        let c = Classifier::new(&ClassifierSpec::default());
        let called = std::cell::Cell::new(false);
        let count = || {
            called.set(true);
            1
        };
        c.classify(&Features { header: None, metadata_class: None, structured: true, text: "", prompt_tokens: &count })
            .unwrap();
        assert!(!called.get());
    }

    #[test]
    fn markers() {
        for code in
            ["def add(a, b):\n    return a + b", "#include <stdio.h>", "int main() {", "class Foo:", "```\nls\n```"]
        {
            assert!(has_code_markers(code), "{code}");
        }
        for text in
            ["Tell me a story about a dragon.", "let me know what you think", "from here to there", "return the book"]
        {
            assert!(!has_code_markers(text), "{text}");
        }
        for math in
            ["2+2", "x = 42", "\\frac{1}{2}", "If Tom has 3 apples and buys 5 more, how many does he have?", "10 - 3"]
        {
            assert!(has_math_markers(math), "{math}");
        }
        for text in ["Tell me about Paris.", "the 2020-2021 season", "a well-known fact", "call me at 5"] {
            assert!(!has_math_markers(text), "{text}");
        }
    }
}
