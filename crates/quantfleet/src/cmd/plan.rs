//! `quantfleet plan`: validates QuantizedModel and PrecisionPolicy files as the API server and the operator
//! would, and prints each tier's memory plan on its accelerator, without a cluster. Exits 1 when a file is
//! invalid or a tier does not fit, so it can gate a GitOps pull request.

use anyhow::{Context, Result, bail};
use quantfleet_api::plan::{AcceleratorTable, ModelPlan, gib, plan_model};
use quantfleet_api::validate::{cel_violations, policy_against_model};
use quantfleet_api::{PrecisionPolicy, QuantizedModel, TierSpec};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML files holding QuantizedModel and PrecisionPolicy documents (several per file allowed).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Extra accelerator for the table, as NAME=MEMORY,COMPUTE_CAPABILITY (e.g. ACME-X1=48Gi,8.9). Repeatable.
    #[arg(long = "accelerator", value_name = "NAME=MEMORY,CC")]
    accelerators: Vec<String>,
}

#[derive(Default)]
struct Resources {
    models: Vec<QuantizedModel>,
    policies: Vec<PrecisionPolicy>,
}

fn read(files: &[PathBuf]) -> Result<Resources> {
    let mut out = Resources::default();
    for path in files {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("{}: document {}", path.display(), i + 1))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
            let at = || format!("{}: document {} ({kind})", path.display(), i + 1);
            match kind.as_str() {
                "QuantizedModel" => out.models.push(serde_yaml::from_value(value).with_context(at)?),
                "PrecisionPolicy" => out.policies.push(serde_yaml::from_value(value).with_context(at)?),
                _ => bail!(
                    "{}: document {} has kind {kind:?}; expected QuantizedModel or PrecisionPolicy",
                    path.display(),
                    i + 1
                ),
            }
        }
    }
    Ok(out)
}

fn precision(tier: &TierSpec) -> String {
    let w = &tier.weights;
    let mut weights = w.format.to_string();
    if let Some(g) = w.effective_group_size().filter(|_| w.format.fixed_block().is_none()) {
        weights.push_str(&format!("-g{g}"));
    }
    if w.method.needs_calibration() {
        weights.push_str(&format!("-{}", w.method));
    }
    format!("{weights}/{}/{}", tier.activations, tier.kv_cache.dtype)
}

fn print_plan(model: &QuantizedModel, plan: &ModelPlan) {
    let name = model.metadata.name.as_deref().unwrap_or("<unnamed>");
    let spec = &model.spec;
    match &plan.accelerator {
        Ok(a) => println!(
            "QuantizedModel {name}: {} x {} ({}, {} each), maxContextTokens {} x maxConcurrency {}",
            spec.accelerator.count,
            a.product,
            a.compute_capability,
            gib(a.memory_bytes),
            spec.serving.max_context_tokens,
            spec.serving.max_concurrency
        ),
        Err(e) => println!("QuantizedModel {name}: {e}"),
    }
    println!(
        "  {:<12} {:<28} {:>12} {:>10} {:>12} {:>12}  FITS",
        "TIER", "WEIGHTS/ACT/KV", "WEIGHTS", "KV/TOKEN", "KV BUDGET", "MAX CONTEXT"
    );
    for (tier, t) in spec.tiers.iter().zip(&plan.tiers) {
        println!(
            "  {:<12} {:<28} {:>12} {:>9}K {:>12} {:>12}  {}",
            t.name,
            precision(tier),
            gib(t.weights.bytes),
            t.kv.bytes_per_token.div_ceil(1024),
            gib(t.kv_budget_bytes.max(0) as u64),
            t.max_context_tokens,
            if t.fits() { "yes" } else { "NO" }
        );
    }
    for t in plan.tiers.iter().filter(|t| !t.fits()) {
        println!("  ! {}", t.message());
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut table = AcceleratorTable::builtin();
    for entry in &args.accelerators {
        table.insert(AcceleratorTable::parse_entry(entry).map_err(anyhow::Error::msg)?);
    }
    let resources = read(&args.files)?;
    let mut ok = true;
    for model in &resources.models {
        let violations = cel_violations(model, None)?;
        for v in &violations {
            println!("QuantizedModel {}: invalid: {v}", model.metadata.name.as_deref().unwrap_or("<unnamed>"));
        }
        ok &= violations.is_empty();
        let plan = plan_model(&model.spec, &table);
        print_plan(model, &plan);
        ok &= plan.all_fit();
    }
    for policy in &resources.policies {
        let name = policy.metadata.name.as_deref().unwrap_or("<unnamed>");
        let mut problems: Vec<String> = cel_violations(policy, None)?.iter().map(ToString::to_string).collect();
        match resources.models.iter().find(|m| {
            m.metadata.name.as_deref() == Some(policy.spec.model_ref.name.as_str())
                && m.metadata.namespace == policy.metadata.namespace
        }) {
            Some(model) => problems.extend(policy_against_model(&policy.spec, &model.spec)),
            None => problems.push(format!(
                "spec.modelRef: QuantizedModel {:?} is not among the files given, so its tiers were not checked",
                policy.spec.model_ref.name
            )),
        }
        if problems.is_empty() {
            println!("PrecisionPolicy {name}: valid against QuantizedModel {}", policy.spec.model_ref.name);
        }
        for p in &problems {
            println!("PrecisionPolicy {name}: invalid: {p}");
        }
        ok &= problems.is_empty();
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
