//! The repository's CRDs (every `*.yaml` under `crds/`) on a real API server: load, server-side apply, wait
//! until Established, and map an object's apiVersion/kind to the resource to call. Also lists the CEL rules
//! (`x-kubernetes-validations`) of a CRD, so tests can check each one is exercised.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde::Deserialize;

use crate::Error;
use crate::wait::{Probe, until};

const FIELD_MANAGER: &str = "quantfleet-testsupport";
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// `crds/` at the repository root.
pub fn repo_crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds")
}

/// Every CRD in `dir`'s `*.yaml` files (several documents per file allowed), in file-name order.
/// An empty directory is an error: a test that installs nothing proves nothing.
pub fn load_crds(dir: &Path) -> Result<Vec<CustomResourceDefinition>, Error> {
    let mut crds = Vec::new();
    for path in yaml_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .map_err(|source| Error::Yaml { path: path.clone(), source })?;
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let crd: CustomResourceDefinition =
                serde_yaml::from_value(value).map_err(|source| Error::Yaml { path: path.clone(), source })?;
            crds.push(crd);
        }
    }
    if crds.is_empty() {
        return Err(Error::InvalidData { path: dir.to_path_buf(), reason: "no CustomResourceDefinition found".into() });
    }
    Ok(crds)
}

/// Sorted `*.yaml` files directly in `dir`.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io_error = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        if path.extension().is_some_and(|e| e == "yaml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Applies every CRD of `dir` (server-side apply, idempotent, safe to call from concurrent tests) and waits until
/// each is Established. The API server rejects a non-structural schema or a CEL rule it cannot compile at apply
/// time, so success also means the schemas were accepted.
pub async fn install_crds(client: &Client, dir: &Path) -> Result<Vec<CustomResourceDefinition>, Error> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut installed = Vec::new();
    for crd in load_crds(dir)? {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(Error::kube(format!("applying CRD {name} from {}", dir.display())))?;
        installed.push(crd);
    }
    for crd in &installed {
        let name = crd.metadata.name.clone().unwrap_or_default();
        until(&format!("CRD {name} to be Established"), ESTABLISH_TIMEOUT, || established(&api, &name)).await?;
    }
    Ok(installed)
}

async fn established(api: &Api<CustomResourceDefinition>, name: &str) -> Result<Probe<()>, Error> {
    let crd = api.get(name).await.map_err(Error::kube(format!("reading CRD {name}")))?;
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    let status = |kind: &str| conditions.iter().find(|c| c.type_ == kind);
    if let Some(names) = status("NamesAccepted").filter(|c| c.status == "False") {
        return Err(Error::InvalidData {
            path: PathBuf::from(name),
            reason: format!("API server did not accept the CRD's names: {}", names.message.clone().unwrap_or_default()),
        });
    }
    Ok(match status("Established") {
        Some(c) if c.status == "True" => Probe::Done(()),
        other => Probe::Pending(format!("Established condition: {:?}", other.map(|c| &c.status))),
    })
}

/// How to call the API for objects of one kind.
#[derive(Clone, Debug)]
pub struct Resource {
    pub api_resource: ApiResource,
    pub namespaced: bool,
}

/// The served resource of `crds` for an object's `apiVersion` and `kind`, if one of them defines it.
pub fn resource_for(crds: &[CustomResourceDefinition], api_version: &str, kind: &str) -> Option<Resource> {
    let (group, version) = api_version.split_once('/')?;
    let crd = crds.iter().find(|c| c.spec.group == group && c.spec.names.kind == kind)?;
    crd.spec.versions.iter().find(|v| v.name == version && v.served)?;
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some(Resource {
        api_resource: ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural),
        namespaced: crd.spec.scope == "Namespaced",
    })
}

/// One CEL validation rule of a CRD version's schema.
#[derive(Clone, Debug)]
pub struct CelRule {
    pub crd: String,
    pub version: String,
    /// Where in the schema, e.g. `.spec.tiers[].weights`.
    pub path: String,
    pub rule: String,
    pub message: Option<String>,
}

/// Every `x-kubernetes-validations` entry of every version of `crd`.
pub fn cel_rules(crd: &CustomResourceDefinition) -> Vec<CelRule> {
    let mut rules = Vec::new();
    let name = crd.metadata.name.clone().unwrap_or_default();
    for version in &crd.spec.versions {
        let Some(schema) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else { continue };
        let Ok(schema) = serde_json::to_value(schema) else { continue };
        let mut found = Vec::new();
        walk_schema(&schema, String::new(), &mut found);
        rules.extend(found.into_iter().map(|(path, rule, message)| CelRule {
            crd: name.clone(),
            version: version.name.clone(),
            path,
            rule,
            message,
        }));
    }
    rules
}

fn walk_schema(schema: &serde_json::Value, path: String, found: &mut Vec<(String, String, Option<String>)>) {
    let Some(object) = schema.as_object() else { return };
    if let Some(validations) = object.get("x-kubernetes-validations").and_then(|v| v.as_array()) {
        for v in validations {
            let rule = v.get("rule").and_then(|r| r.as_str()).unwrap_or_default().to_string();
            let message = v.get("message").and_then(|m| m.as_str()).map(str::to_string);
            found.push((if path.is_empty() { ".".into() } else { path.clone() }, rule, message));
        }
    }
    if let Some(properties) = object.get("properties").and_then(|p| p.as_object()) {
        for (key, child) in properties {
            walk_schema(child, format!("{path}.{key}"), found);
        }
    }
    if let Some(items) = object.get("items") {
        walk_schema(items, format!("{path}[]"), found);
    }
    if let Some(additional) = object.get("additionalProperties") {
        walk_schema(additional, format!("{path}{{}}"), found);
    }
    for combinator in ["allOf", "anyOf", "oneOf"] {
        for child in object.get(combinator).and_then(|c| c.as_array()).into_iter().flatten() {
            walk_schema(child, path.clone(), found);
        }
    }
}
