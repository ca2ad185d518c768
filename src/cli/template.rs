//! The chat-template bounds of the commands that render a model's chat template.

use clap::Args;
use kiln::core::TemplateLimits;

/// `--template-fuel` and `--template-max-bytes`.
#[derive(Args, Debug, Clone)]
pub struct TemplateArgs {
    /// Most instructions the model's chat template may run for one prompt. The template comes
    /// with the model files and is untrusted; real ones use a few hundred for a short chat.
    #[arg(long, default_value_t = TemplateLimits::DEFAULT_FUEL)]
    pub template_fuel: u64,
    /// Most bytes the rendered chat prompt may have.
    #[arg(long, default_value_t = TemplateLimits::DEFAULT_MAX_OUTPUT_BYTES)]
    pub template_max_bytes: usize,
}

impl TemplateArgs {
    /// The limits these flags describe.
    pub fn limits(&self) -> TemplateLimits {
        TemplateLimits::default()
            .with_fuel(self.template_fuel)
            .with_max_output_bytes(self.template_max_bytes)
    }
}
