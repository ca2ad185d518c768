use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use super::precision::PrecisionArgs;
use super::sampling::SamplingArgs;
use super::template::TemplateArgs;
use anyhow::{Context, bail};
use clap::Args;
use kiln::auto;
use kiln::backend::{Backend, NAME, device};
use kiln::core::{ChatSession, GenerationConfig};

pub const LONG_ABOUT: &str = "\
Talk with an instruction-tuned model. Each line you type is a user message; the reply streams as
it is generated and the conversation is remembered. The model's own chat template (from
tokenizer_config.json or the GGUF file) formats the turns, and its KV cache is kept between turns,
so only the new message is processed.

Type /reset to start over, /exit (or Ctrl-D) to leave. When stdin is not a terminal, every line is
one message and each reply ends with a newline, so a conversation can be scripted.

The model defaults to SmolLM2-135M-Instruct (see `kiln generate --help`).

Examples:
  kiln chat
  kiln chat --model ./Mistral-7B-Instruct --system \"Answer in one sentence.\" --temperature 0.7
  printf 'What is the capital of France?\\nAnd of Italy?\\n' | kiln chat";

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model folder, `.gguf` file, or Hugging Face hub id (default: SmolLM2-135M-Instruct).
    #[arg(long, env = "KILN_MODEL")]
    model: Option<String>,
    /// System message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    template: TemplateArgs,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let device = device();
    let start = Instant::now();
    let spec = args.model.clone().unwrap_or_else(auto::default_model);
    let loaded = auto::load_with::<Backend>(&spec, &device, &args.precision.to_options())
        .with_context(|| format!("loading {spec}"))?;
    let tokenizer = &loaded
        .tokenizer
        .clone()
        .context("kiln chat needs the model's tokenizer (tokenizer.json or GGUF vocabulary)")?
        .with_template_limits(args.template.limits());
    let interactive = std::io::stdin().is_terminal();
    eprintln!(
        "kiln: {} ({}) loaded in {:.1}s on {NAME}{}",
        loaded.files.dir.display(),
        loaded.description,
        start.elapsed().as_secs_f64(),
        if interactive {
            "; /reset starts over, /exit leaves"
        } else {
            ""
        }
    );

    // The template's end-of-turn token ends a reply even when config.json names another EOS.
    let eos = loaded.defaults.chat_eos_token_ids(tokenizer);
    if eos.is_empty() {
        bail!("the model names no EOS token, so a reply would never end; use `kiln generate`");
    }
    let sampling = args.sampling.to_config(&loaded.defaults);
    let config = GenerationConfig::default()
        .with_max_new_tokens(args.max_new_tokens)
        .with_sampling(sampling)
        .with_eos_token_ids(eos);
    let mut session = ChatSession::new(&loaded.model, tokenizer, config, args.system.clone())?;

    let mut stdout = std::io::stdout();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin (is it UTF-8?)")?;
        let message = line.trim();
        match message {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                eprintln!("kiln: conversation cleared");
                continue;
            }
            _ => {}
        }
        let start = Instant::now();
        let out = session.reply(message, |piece| {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?;
        writeln!(stdout)?;
        let elapsed = start.elapsed().as_secs_f64();
        if interactive {
            eprintln!(
                "[{} tokens, {:.1} tok/s, {} context tokens reused]",
                out.tokens.len(),
                out.tokens.len() as f64 / elapsed.max(1e-9),
                session.last_reused()
            );
        }
    }
    Ok(())
}
