use std::time::{Duration, Instant};

use super::precision::PrecisionArgs;
use super::template::TemplateArgs;
use anyhow::{Context, bail};
use clap::Args;
use kiln::auto;
use kiln::backend::{Backend, NAME, device};
use kiln_serve::{ServeConfig, serve, serve_translator};

pub const LONG_ABOUT: &str = "\
Serve a model over HTTP with the OpenAI API, so any OpenAI client, editor plugin or
agent framework can use it. Requests that arrive while others decode join the running batch at
the next step (continuous batching); with temperature 0 each gets the tokens `kiln generate`
gives for its prompt alone.

Endpoints:
  POST /v1/chat/completions   messages through the model's chat template; \"stream\": true sends
                              server-sent events ending with `data: [DONE]`
  POST /v1/completions        a text prompt (BOS added as `kiln generate` does)
  GET  /v1/models             the one model served
  GET  /health                status, running and admitted requests (needs no API key)
  POST /v1/translations       NLLB-200 and T5 models instead of the two above:
                              {\"text\", \"source_lang\", \"target_lang\", \"max_tokens\", \"num_beams\",
                              \"temperature\", \"top_p\", \"seed\"} -> {\"text\", \"finish_reason\", \"usage\"};
                              one request at a time, as `kiln translate` runs it

Request fields: max_tokens / max_completion_tokens (default: the rest of the context),
temperature, top_p, top_k, repetition_penalty, frequency_penalty, presence_penalty, seed, stop
(up to 16 strings), stream, stream_options.include_usage. Unset sampling fields take the model's
generation_config.json. Features kiln does not have (n > 1, logprobs, tools, logit_bias, echo,
JSON mode) are a 400 naming the field, as are malformed bodies and prompts or max_tokens past the
context. Past --max-concurrent running and --queue waiting requests, the server answers 503.

It listens on loopback unless --host says otherwise. SIGINT/SIGTERM stop accepting, let open
responses finish for --shutdown-grace seconds, then end the rest (each stream gets a last chunk
with finish_reason \"length\" and `data: [DONE]`) and exit.

Examples:
  kiln serve --port 8080
  kiln serve --model ./Mistral-7B-Instruct --quant q4_0 --api-key secret
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'
  python -c 'import openai; c = openai.OpenAI(base_url=\"http://127.0.0.1:8080/v1\", api_key=\"-\"); \\
    print(c.completions.create(model=\"kiln\", prompt=\"Once upon\", max_tokens=16).choices[0].text)'";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model folder, `.gguf` file, or Hugging Face hub id (default: SmolLM2-135M-Instruct); an
    /// NLLB or T5 model serves /v1/translations.
    #[arg(long, env = "KILN_MODEL")]
    model: Option<String>,
    /// Address to listen on (default loopback only; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    max_concurrent: usize,
    /// Requests that may wait for a place in the batch; beyond them the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Require `Authorization: Bearer <key>` on every request but /health.
    #[arg(long, env = "KILN_API_KEY")]
    api_key: Option<String>,
    /// The model's id in responses and /v1/models (default: the --model value).
    #[arg(long)]
    model_id: Option<String>,
    /// Seconds open responses may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    template: TemplateArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let device = device();
    let start = Instant::now();
    let spec = args.model.clone().unwrap_or_else(auto::default_model);
    let config = ServeConfig::default()
        .with_host(args.host)
        .with_port(args.port)
        .with_max_concurrent(args.max_concurrent)
        .with_queue(args.queue)
        .with_api_key(args.api_key)
        .with_model_id(args.model_id.unwrap_or_else(|| spec.clone()))
        .with_shutdown_grace(Duration::from_secs(args.shutdown_grace));
    let on_ready = |addr| eprintln!("kiln serve: listening on http://{addr}");
    let options = args.precision.to_options();
    let model_type = auto::model_type(&spec).with_context(|| format!("reading {spec}"))?;
    if matches!(model_type.as_str(), "t5" | "m2m_100" | "m2m100" | "nllb") {
        let loaded = auto::load_seq2seq_with::<Backend>(&spec, &device, &options)
            .with_context(|| format!("loading {spec}"))?;
        if loaded.tokenizer.is_none() {
            bail!("kiln serve needs the model's tokenizer.json");
        }
        eprintln!(
            "kiln serve: {} ({model_type}, POST /v1/translations) loaded in {:.1}s on {NAME}",
            loaded.files.dir.display(),
            start.elapsed().as_secs_f64(),
        );
        serve_translator(loaded, config, on_ready)?;
        return Ok(());
    }
    let loaded = auto::load_with::<Backend>(&spec, &device, &options)
        .with_context(|| format!("loading {spec}"))?;
    let tokenizer = loaded
        .tokenizer
        .context("kiln serve needs the model's tokenizer (tokenizer.json or GGUF vocabulary)")?
        .with_template_limits(args.template.limits());
    eprintln!(
        "kiln serve: {} ({}) loaded in {:.1}s on {NAME}",
        loaded.files.dir.display(),
        loaded.description,
        start.elapsed().as_secs_f64(),
    );
    serve(loaded.model, tokenizer, loaded.defaults, config, on_ready)?;
    Ok(())
}
