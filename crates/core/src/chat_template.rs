//! Chat templates rendered as HF transformers renders them, with bounds, because a template
//! comes with the model files and is untrusted code.
//!
//! transformers renders with Jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)`, the `loopcontrols` extension and a `{% generation %}` tag, its own
//! `tojson` (no HTML escaping, `indent`/`separators`/`sort_keys`), and the globals
//! `raise_exception` and `strftime_now` (`transformers/utils/chat_template_utils.py`). kiln
//! renders with minijinja set up the same way; [`TemplateLimits`] bounds the instructions a
//! render may run (minijinja's fuel) and the bytes it may write.

use std::io::Write;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{ErrorKind, Value};
use serde_json::Map;

use crate::tokenizer::Message;
use crate::{Error, Result};

/// Bounds on one render of a chat template.
///
/// The defaults are far above what real templates use (measured by `tests/text/chat_templates.rs` on
/// 38 real templates: at most 381 instructions for a six-message chat, growing linearly with
/// the chat), and low enough that a hostile template stops within a second (0.7 s for the
/// default fuel, measured with `kiln generate --chat` on a nested-loop template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Most template instructions one render may execute (minijinja's fuel).
    pub fuel: u64,
    /// Most bytes the rendered prompt may have.
    pub max_output_bytes: usize,
}

impl TemplateLimits {
    /// Default instruction budget: 20 million.
    pub const DEFAULT_FUEL: u64 = 20_000_000;
    /// Default cap on the rendered prompt: 32 MiB (a 128k-token context is well under 1 MiB of
    /// text).
    pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 32 << 20;

    /// Sets the instruction budget.
    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.fuel = fuel;
        self
    }

    /// Sets the cap on the rendered prompt's size.
    pub fn with_max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }
}

impl Default for TemplateLimits {
    fn default() -> Self {
        Self {
            fuel: Self::DEFAULT_FUEL,
            max_output_bytes: Self::DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

/// What a chat template is rendered with: the messages and the keyword arguments HF's
/// `apply_chat_template` passes (`add_generation_prompt`, `tools`, `documents`, any extra such
/// as `enable_thinking`).
#[derive(Debug, Clone, Default)]
pub struct ChatTemplateInputs {
    messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    tools: Option<serde_json::Value>,
    documents: Option<serde_json::Value>,
    extra: Map<String, serde_json::Value>,
}

impl ChatTemplateInputs {
    /// Plain `{role, content}` messages.
    pub fn new(messages: &[Message]) -> Self {
        Self::from_json(
            messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect(),
        )
    }

    /// Messages as JSON objects, with whatever fields the template reads (`tool_calls`,
    /// content parts, ...). As in HF, keys whose value is `null` are dropped.
    pub fn from_json(messages: Vec<serde_json::Value>) -> Self {
        let messages = messages
            .into_iter()
            .map(|m| match m {
                serde_json::Value::Object(o) => {
                    serde_json::Value::Object(o.into_iter().filter(|(_, v)| !v.is_null()).collect())
                }
                other => other,
            })
            .collect();
        Self {
            messages,
            ..Self::default()
        }
    }

    /// Ends the prompt with the header of an assistant turn.
    pub fn with_generation_prompt(mut self, yes: bool) -> Self {
        self.add_generation_prompt = yes;
        self
    }

    /// Tool (function) definitions, as the OpenAI API and HF take them.
    pub fn with_tools(mut self, tools: serde_json::Value) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Documents for retrieval-augmented templates.
    pub fn with_documents(mut self, documents: serde_json::Value) -> Self {
        self.documents = Some(documents);
        self
    }

    /// Any other template variable, e.g. `enable_thinking`. Overrides special tokens of the
    /// same name, as in HF.
    pub fn with_kwarg(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.extra.insert(name.into(), value);
        self
    }
}

/// The result of one render.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    /// The prompt text.
    pub text: String,
    /// Template instructions the render executed (compare with [`TemplateLimits::fuel`]).
    pub fuel_used: u64,
}

/// A chat template and where it came from (named in errors).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    source: String,
    origin: String,
    limits: TemplateLimits,
}

impl ChatTemplate {
    /// A template (Jinja source) from `origin`, e.g. the file it was read from.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            origin: origin.into(),
            limits: TemplateLimits::default(),
        }
    }

    /// Sets the bounds on each render.
    pub fn with_limits(mut self, limits: TemplateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The bounds on each render.
    pub fn limits(&self) -> TemplateLimits {
        self.limits
    }

    /// Renders `inputs`, with `special_tokens` (`bos_token`, `eos_token`, ...) as variables.
    pub fn render(
        &self,
        inputs: &ChatTemplateInputs,
        special_tokens: &[(&str, &str)],
    ) -> Result<RenderedChat> {
        let fail = |what: String| Error::ChatTemplate(format!("{}: {what}", self.origin));
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(self.limits.fuel));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let source = without_generation_tags(&self.source);
        env.add_template("chat_template", &source)
            .map_err(|e| fail(describe(&e)))?;

        let mut context: Map<String, serde_json::Value> = special_tokens
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        context.insert("messages".into(), inputs.messages.clone().into());
        context.insert("tools".into(), inputs.tools.clone().into());
        context.insert("documents".into(), inputs.documents.clone().into());
        context.insert(
            "add_generation_prompt".into(),
            inputs.add_generation_prompt.into(),
        );
        context.extend(inputs.extra.clone());

        let mut out = CappedWriter {
            bytes: Vec::new(),
            cap: self.limits.max_output_bytes,
            exceeded: false,
        };
        let template = env
            .get_template("chat_template")
            .map_err(|e| fail(describe(&e)))?;
        let result = template.render_captured_to(context, &mut out);
        if out.exceeded {
            return Err(fail(format!(
                "the rendered prompt exceeds {} bytes (TemplateLimits::max_output_bytes, CLI \
                 --template-max-bytes)",
                self.limits.max_output_bytes
            )));
        }
        let captured = result.map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => fail(format!(
                "rendering ran past {} template instructions (TemplateLimits::fuel, CLI \
                 --template-fuel); real chat templates use under 400 for a six-message chat",
                self.limits.fuel
            )),
            _ => fail(describe(&e)),
        })?;
        let fuel_used = captured.state().fuel_levels().map_or(0, |(used, _)| used);
        let text =
            String::from_utf8(out.bytes).map_err(|_| fail("rendered text is not UTF-8".into()))?;
        Ok(RenderedChat { text, fuel_used })
    }
}

/// A minijinja error with its template line, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(detail) = e.detail()
        && !s.contains(detail)
    {
        s = format!("{s}: {detail}");
    }
    if let Some(line) = e.line()
        && !s.contains("line")
    {
        s = format!("{s} (line {line})");
    }
    s
}

/// Collects output up to a cap, then fails the render.
struct CappedWriter {
    bytes: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks and
/// renders its body unchanged; minijinja has no custom tags, so each becomes an always-true
/// `if` block with the same whitespace control, which trims exactly as the original tag.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|i| i + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let left = inner.strip_prefix(['-', '+']).map(|_| &inner[..1]);
        let right = inner
            .strip_suffix(['-', '+'])
            .map(|_| &inner[inner.len() - 1..]);
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(left.unwrap_or(""));
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(right.unwrap_or(""));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `strftime_now(format)`: the current time formatted as Python's `strftime` does. kiln
/// uses UTC (HF uses the local time zone). Written here because minijinja-contrib's date
/// functions need the `time` crate's formatting features and use another format syntax.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python `strftime` for a UTC time in seconds since 1970 (C-locale names; unknown directives
/// are kept as written, as CPython on glibc does).
pub(crate) fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (tod / 3600, tod % 3600 / 60, tod % 60);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// HF's `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, without Jinja's HTML escaping. minijinja's own `tojson` escapes `<`, `>`,
/// `&` and `'` and formats differently, which changes tool prompts.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(
                " ".repeat(
                    i64::try_from(v)
                        .map_err(|_| bad("tojson: indent must be an integer or a string"))?
                        .clamp(0, 64) as usize,
                ),
            ),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v
                .try_iter()
                .map_err(|_| bad("tojson: separators must be a pair of strings"))?
                .collect();
            match parts.as_slice() {
                [a, b] => (
                    a.as_str().unwrap_or(",").to_string(),
                    b.as_str().unwrap_or(":").to_string(),
                ),
                _ => return Err(bad("tojson: separators must be a pair of strings")),
            }
        }
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

fn bad(message: &str) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message.to_string())
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(unit) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(unit);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).unwrap_or_default();
        if self.ensure_ascii {
            for c in quoted.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
            }
        } else {
            out.push_str(&quoted);
        }
    }

    fn write(
        &self,
        value: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        if level > 256 {
            return Err(bad("tojson: value nested too deeply"));
        }
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&value.get_item(key)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            _ => self.string(&value.to_string(), out),
        }
        Ok(())
    }
}

/// A number as Python's `json.dumps` writes it (`1.0` stays `1.0`, `1e+20`).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(f) = f64::try_from(value.clone()) else {
        return value.to_string();
    };
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python repr: shortest round-trip digits, exponent with sign and at least 2 digits.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // python3 -c "import datetime as d; print(d.datetime(2024,7,26,15,4,5).strftime(...))"
        let t = 1_722_006_245; // 2024-07-26 15:04:05 UTC, a Friday
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %a %B %m/%d/%y %H:%M:%S %I%p %j %e %%", t),
            "Friday Fri July 07/26/24 15:04:05 03PM 208 26 %"
        );
        // Leap day, and a date before 1970.
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        assert_eq!(strftime("%Y-%m-%d %a", -86_400), "1969-12-31 Wed");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            without_generation_tags("a{%- generation -%}b{% endgeneration %}c{{ x }}"),
            "a{%- if true -%}b{% endif %}c{{ x }}"
        );
        assert_eq!(without_generation_tags("{% if x %}"), "{% if x %}");
        assert_eq!(without_generation_tags("broken {%"), "broken {%");
        // Found by fuzzing: the `%}` of `{%}` overlaps its `{%`.
        assert_eq!(without_generation_tags("{%}{{ x }}"), "{%}{{ x }}");
    }
}
