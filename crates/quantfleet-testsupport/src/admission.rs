//! Admission cases: data files under `tests/admission/` (written with the API crate), each an object the real
//! API server must accept or reject with a given message, optionally as an update of a first accepted object.
//! This module loads and checks the files and runs one case against the API server; the control-plane test
//! iterates over every file, so adding a case needs no code.
//!
//! One file (YAML or JSON):
//! ```yaml
//! description: what this case checks (one line)
//! expect: accept            # or: reject
//! messageContains: "..."    # reject only: a substring the API server's error must contain
//! object: { apiVersion: quantfleet.io/v1alpha1, kind: QuantizedModel, metadata: {name: x}, spec: {} }
//! updateTo: { ... }         # optional: create `object` first (it must be accepted), then replace it with this
//! ```

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, PostParams};
use kube::{Api, Client};
use serde::Deserialize;

use crate::Error;
use crate::crds::{Resource, resource_for, yaml_files};

/// `tests/admission/` at the repository root.
pub fn repo_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/admission")
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Accept,
    Reject,
}

/// One case as written in its file (unknown keys, e.g. notes for other runners, are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaseFile {
    description: String,
    expect: Expect,
    message_contains: Option<String>,
    object: DynamicObject,
    update_to: Option<DynamicObject>,
}

/// A checked admission case.
#[derive(Clone, Debug)]
pub struct AdmissionCase {
    pub file: PathBuf,
    pub description: String,
    pub expect: Expect,
    /// Set exactly when `expect` is `Reject`.
    pub message_contains: Option<String>,
    pub object: DynamicObject,
    pub update_to: Option<DynamicObject>,
}

impl AdmissionCase {
    /// The file name, for reports.
    pub fn file_name(&self) -> String {
        self.file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Loads and checks every `*.yaml` case in `dir`; an empty directory is an error.
pub fn load_cases(dir: &Path) -> Result<Vec<AdmissionCase>, Error> {
    let cases = yaml_files(dir)?.iter().map(|path| load_case(path)).collect::<Result<Vec<_>, _>>()?;
    if cases.is_empty() {
        return Err(Error::InvalidData { path: dir.to_path_buf(), reason: "no admission cases (*.yaml)".into() });
    }
    Ok(cases)
}

fn load_case(path: &Path) -> Result<AdmissionCase, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let file: CaseFile =
        serde_yaml::from_str(&text).map_err(|source| Error::Yaml { path: path.to_path_buf(), source })?;
    let invalid = |reason: String| Error::InvalidData { path: path.to_path_buf(), reason };
    match (file.expect, &file.message_contains) {
        (Expect::Reject, None) => return Err(invalid("expect: reject needs messageContains".into())),
        (Expect::Reject, Some(m)) if m.trim().is_empty() => {
            return Err(invalid("messageContains is empty, it would match any error".into()));
        }
        (Expect::Accept, Some(_)) => return Err(invalid("messageContains is for expect: reject only".into())),
        _ => {}
    }
    for (field, object) in
        std::iter::once(("object", &file.object)).chain(file.update_to.iter().map(|o| ("updateTo", o)))
    {
        if object.types.is_none() {
            return Err(invalid(format!("{field} needs apiVersion and kind")));
        }
        if object.metadata.name.as_deref().unwrap_or_default().is_empty() {
            return Err(invalid(format!("{field} needs metadata.name")));
        }
    }
    if let Some(update) = &file.update_to
        && (update.metadata.name != file.object.metadata.name || update.types != file.object.types)
    {
        return Err(invalid("updateTo must keep the object's apiVersion, kind and name".into()));
    }
    Ok(AdmissionCase {
        file: path.to_path_buf(),
        description: file.description,
        expect: file.expect,
        message_contains: file.message_contains,
        object: file.object,
        update_to: file.update_to,
    })
}

/// What happened to one case: `passed` when the API server behaved as the case expects; `detail` says what
/// the server did (its error message, if any).
#[derive(Clone, Debug)]
pub struct CaseOutcome {
    pub passed: bool,
    pub detail: String,
}

/// Runs `case` in `namespace` (its objects' namespaces are overridden) against CRDs already installed.
pub async fn run_case(
    client: &Client,
    namespace: &str,
    crds: &[CustomResourceDefinition],
    case: &AdmissionCase,
) -> CaseOutcome {
    let types = case.object.types.clone().unwrap_or_default();
    let Some(resource) = resource_for(crds, &types.api_version, &types.kind) else {
        return failed(format!("no installed CRD serves {} {}", types.api_version, types.kind));
    };
    let api = api_for(client, namespace, &resource);
    let params = PostParams::default();
    let mut object = case.object.clone();
    object.metadata.namespace = resource.namespaced.then(|| namespace.to_string());

    let result = match &case.update_to {
        None => api.create(&params, &object).await,
        Some(update) => {
            let created = match api.create(&params, &object).await {
                Ok(created) => created,
                Err(e) => return failed(format!("the object to update was not created: {}", describe(&e))),
            };
            let mut update = update.clone();
            update.metadata.namespace = object.metadata.namespace.clone();
            update.metadata.resource_version = created.metadata.resource_version;
            let name = update.metadata.name.clone().unwrap_or_default();
            api.replace(&name, &params, &update).await
        }
    };
    judge(case, result)
}

fn judge(case: &AdmissionCase, result: Result<DynamicObject, kube::Error>) -> CaseOutcome {
    let wanted = case.message_contains.as_deref().unwrap_or_default();
    match (case.expect, result) {
        (Expect::Accept, Ok(_)) => CaseOutcome { passed: true, detail: "accepted".into() },
        (Expect::Accept, Err(e)) => failed(format!("expected accept, got {}", describe(&e))),
        (Expect::Reject, Ok(_)) => failed(format!("expected a rejection containing {wanted:?}, but it was accepted")),
        (Expect::Reject, Err(kube::Error::Api(status))) if status.message.contains(wanted) => {
            CaseOutcome { passed: true, detail: format!("rejected ({}): {}", status.code, status.message) }
        }
        (Expect::Reject, Err(e)) => failed(format!("expected a rejection containing {wanted:?}, got {}", describe(&e))),
    }
}

fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("rejection ({} {}): {}", status.code, status.reason, status.message),
        other => format!("request error: {other}"),
    }
}

fn failed(detail: String) -> CaseOutcome {
    CaseOutcome { passed: false, detail }
}

fn api_for(client: &Client, namespace: &str, resource: &Resource) -> Api<DynamicObject> {
    if resource.namespaced {
        Api::namespaced_with(client.clone(), namespace, &resource.api_resource)
    } else {
        Api::all_with(client.clone(), &resource.api_resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn case_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("qf-admission-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let object = "object: {apiVersion: quantfleet.io/v1alpha1, kind: QuantizedModel, metadata: {name: x}}";
        let ok = write(&dir, "ok.yaml", &format!("description: d\nexpect: reject\nmessageContains: m\n{object}\n"));
        let case = load_case(&ok).unwrap();
        assert_eq!(case.expect, Expect::Reject);
        assert_eq!(case.object.types.as_ref().unwrap().kind, "QuantizedModel");

        let bad = [
            format!("description: d\nexpect: reject\n{object}\n"),
            format!("description: d\nexpect: accept\nmessageContains: m\n{object}\n"),
            format!("description: d\nexpect: reject\nmessageContains: ' '\n{object}\n"),
            "description: d\nexpect: accept\nobject: {apiVersion: v1, kind: X, metadata: {}}\n".to_string(),
            format!("description: d\nexpect: maybe\n{object}\n"),
            format!(
                "description: d\nexpect: accept\n{object}\nupdateTo: {{apiVersion: v1, kind: X, metadata: {{name: x}}}}\n"
            ),
        ];
        for (i, text) in bad.iter().enumerate() {
            let path = write(&dir, &format!("bad{i}.yaml"), text);
            assert!(load_case(&path).is_err(), "case {i} should be refused: {text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
