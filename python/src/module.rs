//! `credstream._credstream`: the PyO3 module over [`Publisher`]. The
//! Python package (`credstream/__init__.py`) wraps it with docstrings,
//! keyword defaults and the context manager; this file only converts
//! arguments, releases the GIL around blocking calls and maps
//! [`ErrorKind`] to exception classes.
// PyO3's macros expand to `unsafe` FFI glue; this crate writes none itself.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use credstream_client::identity::IdentityOptions;

use crate::publisher::{
    ErrorKind, Publisher, PublisherError, PublisherOptions, Status, cluster_seal_key,
};

create_exception!(
    _credstream,
    CredstreamError,
    PyException,
    "Base class of every credstream error; the message ends with a `fix:` line where there is one."
);
create_exception!(
    _credstream,
    AuthenticationError,
    CredstreamError,
    "The broker rejected the token (expired, forged, or from another broker's key)."
);
create_exception!(
    _credstream,
    PermissionDeniedError,
    CredstreamError,
    "The token is valid, but not a publisher token for this cluster."
);
create_exception!(
    _credstream,
    BrokerUnreachableError,
    CredstreamError,
    "The broker could not be reached (wrong address, not running, a firewall)."
);
create_exception!(
    _credstream,
    TLSError,
    CredstreamError,
    "TLS with the broker failed, or a token would have gone in plaintext to a remote host."
);
create_exception!(
    _credstream,
    NoCredentialsError,
    CredstreamError,
    "No local credentials for any kind asked for, and no private env: nothing to publish."
);
create_exception!(
    _credstream,
    ConfigurationError,
    CredstreamError,
    "An option is wrong: an unreadable file, a bad URL, a bad variable name, a duration out of range."
);
create_exception!(
    _credstream,
    TakenOverError,
    CredstreamError,
    "Another publisher took over the cluster; this one has stopped."
);
create_exception!(
    _credstream,
    PublisherClosedError,
    CredstreamError,
    "The publisher was closed (or its session ended); create a new one."
);
create_exception!(
    _credstream,
    DeliveryTimeoutError,
    CredstreamError,
    "wait_delivered() ran out of time before every agent held the latest version."
);

fn to_py(error: PublisherError) -> PyErr {
    let message = error.message;
    match error.kind {
        ErrorKind::Authentication => AuthenticationError::new_err(message),
        ErrorKind::Permission => PermissionDeniedError::new_err(message),
        ErrorKind::Unreachable => BrokerUnreachableError::new_err(message),
        ErrorKind::Tls => TLSError::new_err(message),
        ErrorKind::NoCredentials => NoCredentialsError::new_err(message),
        ErrorKind::Config => ConfigurationError::new_err(message),
        ErrorKind::TakenOver => TakenOverError::new_err(message),
        ErrorKind::Closed => PublisherClosedError::new_err(message),
        ErrorKind::Timeout => DeliveryTimeoutError::new_err(message),
        ErrorKind::Other => CredstreamError::new_err(message),
    }
}

/// The native publisher; use `credstream.Publisher`.
#[pyclass(module = "credstream._credstream", name = "NativePublisher", frozen)]
struct NativePublisher {
    inner: RwLock<Option<Publisher>>,
}

impl NativePublisher {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        call: impl FnOnce(&Publisher) -> Result<T, PublisherError> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(publisher) => call(publisher),
                None => Err(PublisherError {
                    kind: ErrorKind::Closed,
                    message: "the publisher is closed; create a new credstream.Publisher".into(),
                }),
            }
        })
        .map_err(to_py)
    }
}

#[pymethods]
impl NativePublisher {
    #[new]
    #[pyo3(signature = (
        broker, cluster, token, token_file, aws, gcp, aws_profile, aws_role_arn,
        aws_session_policy, aws_duration, gcp_scopes, env, env_files, revoke_on_close,
        ca_cert, tls_client_cert, tls_client_key, insecure, seal, seal_key_file,
        aws_source_identity, aws_tags, session_seal_key=false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        broker: String,
        cluster: String,
        token: Option<String>,
        token_file: Option<PathBuf>,
        aws: bool,
        gcp: bool,
        aws_profile: Option<String>,
        aws_role_arn: Option<String>,
        aws_session_policy: Option<PathBuf>,
        aws_duration: Option<f64>,
        gcp_scopes: Vec<String>,
        env: Vec<(String, String)>,
        env_files: Vec<PathBuf>,
        revoke_on_close: bool,
        ca_cert: Option<PathBuf>,
        tls_client_cert: Option<PathBuf>,
        tls_client_key: Option<PathBuf>,
        insecure: bool,
        seal: bool,
        seal_key_file: Option<PathBuf>,
        aws_source_identity: Option<String>,
        aws_tags: Vec<(String, String)>,
        session_seal_key: bool,
    ) -> PyResult<Self> {
        let aws_duration = match aws_duration {
            Some(seconds) if !(seconds.is_finite() && seconds > 0.0) => {
                return Err(ConfigurationError::new_err(format!(
                    "aws_duration must be a positive number of seconds or a string like \"12h\", not {seconds}"
                )));
            }
            Some(seconds) => Some(Duration::from_secs_f64(seconds)),
            None => None,
        };
        let options = PublisherOptions {
            broker,
            cluster,
            token,
            token_file,
            ca_cert,
            tls_client_cert,
            tls_client_key,
            insecure,
            identity: IdentityOptions {
                aws,
                gcp,
                aws_profile,
                aws_role_arn,
                aws_session_policy,
                aws_duration,
                gcp_scopes,
            },
            env,
            env_files,
            revoke_on_close,
            no_seal: !seal,
            seal_key_file,
            session_seal_key,
            aws_source_identity,
            aws_tags,
        };
        let publisher = py.detach(|| Publisher::start(options)).map_err(to_py)?;
        Ok(Self {
            inner: RwLock::new(Some(publisher)),
        })
    }

    /// One line per kind asked for: who it publishes as, or why not.
    fn identity_lines(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |p| Ok(p.identity_lines().to_vec()))
    }

    /// How it seals: `(line, key_id, key_file)`; the last two `None` when
    /// not sealing. No key material.
    fn seal_info(&self, py: Python<'_>) -> PyResult<(String, Option<String>, Option<String>)> {
        self.with(py, |p| {
            let info = p.seal_info();
            Ok((
                info.line.clone(),
                info.key_id.clone(),
                info.key_file
                    .as_ref()
                    .map(|path| path.to_string_lossy().into_owned()),
            ))
        })
    }

    /// The session's seal key line (secret), for the Dask plugin only;
    /// `None` unless it was made with `session_seal_key`.
    fn session_seal_key(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with(py, |p| {
            Ok(p.session_seal_key().map(|line| line.to_string()))
        })
    }

    /// The kinds being published.
    fn kinds(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |p| {
            Ok(p.kinds().into_iter().map(str::to_owned).collect())
        })
    }

    fn send_private_envs(&self, py: Python<'_>, vars: Vec<(String, String)>) -> PyResult<()> {
        self.with(py, |p| p.send_private_envs(vars))
    }

    fn unset_private_envs(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        self.with(py, |p| p.unset_private_envs(names))
    }

    fn is_running(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| {
            let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
            Ok(guard.as_ref().is_some_and(Publisher::is_running))
        })
    }

    fn wait_delivered(&self, py: Python<'_>, timeout: f64, min_agents: u32) -> PyResult<()> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(ConfigurationError::new_err(format!(
                "timeout must be a number of seconds >= 0, not {timeout}"
            )));
        }
        let mut interrupt: Option<PyErr> = None;
        let result = self.with(py, |p| {
            p.wait_delivered(Duration::from_secs_f64(timeout), min_agents, || {
                Python::attach(|py| py.check_signals()).map_err(|error| {
                    interrupt = Some(error);
                    PublisherError {
                        kind: ErrorKind::Other,
                        message: "interrupted".into(),
                    }
                })
            })
        });
        match interrupt {
            Some(error) => Err(error),
            None => result,
        }
    }

    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let status = self.with(py, Publisher::status)?;
        status_dict(py, &status)
    }

    #[pyo3(signature = (revoke=None))]
    fn close(&self, py: Python<'_>, revoke: Option<bool>) -> PyResult<bool> {
        py.detach(|| {
            let taken = self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
            match taken {
                Some(mut publisher) => publisher.close(revoke),
                None => Ok(false),
            }
        })
        .map_err(to_py)
    }
}

fn status_dict<'py>(py: Python<'py>, status: &Status) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("cluster", &status.cluster)?;
    dict.set_item("broker", &status.broker)?;
    dict.set_item("connected", status.connected)?;
    dict.set_item("version", status.version)?;
    let credentials = PyList::empty(py);
    for c in &status.credentials {
        let item = PyDict::new(py);
        item.set_item("kind", c.kind)?;
        item.set_item("principal", &c.principal)?;
        item.set_item("account", &c.account)?;
        item.set_item("version", c.version)?;
        item.set_item("issued_at", c.issued_at)?;
        item.set_item("expires_at", c.expires_at)?;
        item.set_item("sealed", c.sealed)?;
        credentials.append(item)?;
    }
    dict.set_item("credentials", credentials)?;
    let env = PyDict::new(py);
    env.set_item("version", status.env_version)?;
    env.set_item("names", &status.env_names)?;
    env.set_item("sealed", status.env_sealed)?;
    dict.set_item("private_env", env)?;
    dict.set_item("sealed", status.sealed)?;
    let agents = PyList::empty(py);
    for a in &status.agents {
        let item = PyDict::new(py);
        item.set_item("agent_id", &a.agent_id)?;
        item.set_item("acked_version", a.acked_version)?;
        item.set_item("connected_at", a.connected_at)?;
        agents.append(item)?;
    }
    dict.set_item("agents", agents)?;
    dict.set_item("agents_connected", status.agents.len())?;
    dict.set_item("agents_current", status.agents_current)?;
    dict.set_item("last_refresh_error", &status.last_refresh_error)?;
    let mint_errors = PyDict::new(py);
    for (kind, message) in &status.mint_errors {
        mint_errors.set_item(kind, message)?;
    }
    dict.set_item("mint_errors", mint_errors)?;
    dict.set_item("disconnected", &status.disconnected)?;
    dict.set_item("ended", &status.ended)?;
    Ok(dict)
}

/// The seal key of `cluster` as `credstream publish` finds it (read, or
/// created on first use): `(line, key_id, key_file)`. The line is the
/// secret the Dask plugin carries to the workers' agents.
#[pyfunction]
#[pyo3(signature = (cluster, seal_key_file=None))]
fn seal_key(
    py: Python<'_>,
    cluster: String,
    seal_key_file: Option<PathBuf>,
) -> PyResult<(String, String, String)> {
    let key = py
        .detach(|| cluster_seal_key(&cluster, seal_key_file.as_deref()))
        .map_err(to_py)?;
    Ok((
        key.line.to_string(),
        key.key_id,
        key.key_file.to_string_lossy().into_owned(),
    ))
}

#[pymodule]
fn _credstream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativePublisher>()?;
    m.add_function(wrap_pyfunction!(seal_key, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CredstreamError", py.get_type::<CredstreamError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add(
        "PermissionDeniedError",
        py.get_type::<PermissionDeniedError>(),
    )?;
    m.add(
        "BrokerUnreachableError",
        py.get_type::<BrokerUnreachableError>(),
    )?;
    m.add("TLSError", py.get_type::<TLSError>())?;
    m.add("NoCredentialsError", py.get_type::<NoCredentialsError>())?;
    m.add("ConfigurationError", py.get_type::<ConfigurationError>())?;
    m.add("TakenOverError", py.get_type::<TakenOverError>())?;
    m.add(
        "PublisherClosedError",
        py.get_type::<PublisherClosedError>(),
    )?;
    m.add(
        "DeliveryTimeoutError",
        py.get_type::<DeliveryTimeoutError>(),
    )?;
    Ok(())
}
