//! Chat templates render exactly as HF transformers renders them (`render_jinja_template`, what
//! `apply_chat_template(tokenize=False)` returns), for 39 real template families and a feature
//! template, recorded by `tools/make_fixtures.py --only chat-templates`; and a hostile template
//! stops with a clear error instead of hanging.

use std::time::{Duration, Instant};

use crate::common::fixture;
use kiln::core::{ChatTemplate, ChatTemplateInputs, Error, TemplateLimits};
use serde::Deserialize;

#[derive(Deserialize)]
struct Templates {
    templates: Vec<TemplateEntry>,
}

#[derive(Deserialize)]
struct TemplateEntry {
    name: String,
    template: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    tools: Option<serde_json::Value>,
    documents: Option<serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn read<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    let path = fixture("chat-templates").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/make_fixtures.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The feature template ends with `strftime_now("%Y") | length`, so the date does not matter.
const FEATURES: &str = "kiln: HF environment features";

#[test]
fn renders_as_transformers_does() {
    let templates: Templates = read("templates.json");
    let reference: Reference = read("reference.json");
    assert!(reference.cases.len() >= 300, "{}", reference.cases.len());
    let mut failures = Vec::new();
    let mut max_fuel = (0, String::new());
    for case in &reference.cases {
        let entry = templates
            .templates
            .iter()
            .find(|t| t.name == case.template)
            .unwrap();
        let template = ChatTemplate::new(entry.template.clone(), entry.name.clone());
        let mut inputs = ChatTemplateInputs::from_json(case.messages.clone())
            .with_generation_prompt(case.add_generation_prompt);
        if let Some(tools) = &case.tools {
            inputs = inputs.with_tools(tools.clone());
        }
        if let Some(documents) = &case.documents {
            inputs = inputs.with_documents(documents.clone());
        }
        let special = [
            ("bos_token", entry.bos_token.as_str()),
            ("eos_token", entry.eos_token.as_str()),
        ];
        let what = format!(
            "{} / {} / generation prompt {}",
            case.template, case.conversation, case.add_generation_prompt
        );
        match (
            template.render(&inputs, &special),
            &case.expected,
            &case.error,
        ) {
            (Ok(r), Some(expected), _) => {
                if r.fuel_used > max_fuel.0 {
                    max_fuel = (r.fuel_used, what.clone());
                }
                if &r.text != expected {
                    failures.push(format!(
                        "{what}:\n  HF:   {expected:?}\n  kiln: {:?}",
                        r.text
                    ));
                }
            }
            (Err(e), None, Some(hf)) => {
                // A template's own raise_exception message must come through.
                if let Some(message) = hf.strip_prefix("TemplateError: ")
                    && !e.to_string().contains(message)
                {
                    failures.push(format!("{what}: HF raised {hf:?}, kiln said {e}"));
                }
            }
            (Ok(r), None, Some(hf)) => failures.push(format!(
                "{what}: HF raised {hf:?}, kiln rendered {:?}",
                r.text
            )),
            (Err(e), Some(_), _) => failures.push(format!("{what}: kiln failed: {e}")),
            (_, None, None) => panic!("{what}: reference has neither output nor error"),
        }
    }
    eprintln!(
        "most template instructions used: {} ({})",
        max_fuel.0, max_fuel.1
    );
    assert!(
        failures.is_empty(),
        "{} of {} renders differ from HF:\n{}",
        failures.len(),
        reference.cases.len(),
        failures.join("\n")
    );
    // The default budget is far above what real templates use.
    assert!(
        max_fuel.0 * 1000 < TemplateLimits::DEFAULT_FUEL,
        "{max_fuel:?}"
    );
    assert!(
        reference
            .cases
            .iter()
            .any(|c| c.template == FEATURES && c.expected.is_some())
    );
}

fn hostile(source: &str, limits: TemplateLimits) -> (Error, Duration) {
    let template = ChatTemplate::new(source, "hostile/tokenizer_config.json").with_limits(limits);
    let inputs = ChatTemplateInputs::new(&[kiln::core::Message::new("user", "hi")]);
    let start = Instant::now();
    let err = template.render(&inputs, &[]).unwrap_err();
    (err, start.elapsed())
}

/// The template: 10^12 iterations of nested loops, each under minijinja's own
/// `range` limit. It must stop on the instruction budget, quickly, naming the template.
#[test]
fn nested_loops_run_out_of_fuel() {
    let source = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}x\
                  {% endfor %}{% endfor %}{% endfor %}";
    let (err, took) = hostile(
        source,
        TemplateLimits::default().with_max_output_bytes(usize::MAX),
    );
    let message = err.to_string();
    assert!(matches!(err, Error::ChatTemplate(_)), "{message}");
    assert!(
        message.contains("hostile/tokenizer_config.json") && message.contains("instructions"),
        "{message}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// Output that grows fast per instruction (a 100 kB string per iteration) stops at the size cap.
#[test]
fn huge_output_stops_at_the_size_cap() {
    let source = "{% for i in range(10000) %}{{ 'x' * 100000 }}{% endfor %}";
    let limits = TemplateLimits::default().with_max_output_bytes(1 << 20);
    let (err, _) = hostile(source, limits);
    let message = err.to_string();
    assert!(
        message.contains("hostile/tokenizer_config.json") && message.contains("1048576 bytes"),
        "{message}"
    );
}

#[test]
fn syntax_errors_name_the_template() {
    let (err, _) = hostile("{% for m in messages %}", TemplateLimits::default());
    assert!(
        err.to_string().contains("hostile/tokenizer_config.json"),
        "{err}"
    );
}
