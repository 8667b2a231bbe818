//! The agent's executors: its own kind (the `executor` setting) plus any others the
//! `allowed_executors` setting lets a spec ask for, behind one [`Executor`]. A job runs on the
//! backend its spec names (`spec.executor`), or on the agent's own when it names none; a
//! named backend this agent does not allow fails the start with
//! [`ExecError::ExecutorUnavailable`]. Handles are routed back to the backend that produced
//! them (every handle comes from this selector's `start`, `find` or `list`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_core::ids::AgentId;
use drover_core::spec::ExecutorName;
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, FoundExecution, Job, OutputStream, Started,
    Termination,
};

pub struct ExecutorSet {
    own: ExecutorName,
    own_backend: Arc<dyn Executor>,
    backends: BTreeMap<ExecutorName, Arc<dyn Executor>>,
    /// Execution name → the backend that runs it.
    owners: Mutex<HashMap<String, ExecutorName>>,
}

impl ExecutorSet {
    /// The agent's own backend, and the others a spec may ask for.
    pub fn new(
        own: ExecutorName,
        own_backend: Arc<dyn Executor>,
        others: BTreeMap<ExecutorName, Arc<dyn Executor>>,
    ) -> Self {
        let mut backends = others;
        backends.insert(own, own_backend.clone());
        Self {
            own,
            own_backend,
            backends,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// A set of one backend.
    pub fn single(own: ExecutorName, executor: Arc<dyn Executor>) -> Self {
        Self::new(own, executor, BTreeMap::new())
    }

    pub fn allowed(&self) -> Vec<&'static str> {
        self.backends.keys().map(|k| k.as_str()).collect()
    }

    fn pick(&self, job: &Job) -> Result<(ExecutorName, &Arc<dyn Executor>), ExecError> {
        let wanted = job.spec.executor.unwrap_or(self.own);
        self.backends
            .get(&wanted)
            .map(|b| (wanted, b))
            .ok_or_else(|| ExecError::ExecutorUnavailable {
                requested: wanted.as_str().to_owned(),
                allowed: self.allowed().join(", "),
            })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, ExecutorName>> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, name: &str, kind: ExecutorName) {
        self.owners().insert(name.to_owned(), kind);
    }

    fn owner_of(&self, handle: &ExecHandle) -> ExecutorName {
        self.owners().get(&handle.name).copied().unwrap_or(self.own)
    }

    fn backend_of(&self, handle: &ExecHandle) -> &Arc<dyn Executor> {
        let kind = self.owner_of(handle);
        self.backends.get(&kind).unwrap_or(&self.own_backend)
    }
}

impl Executor for ExecutorSet {
    fn name(&self) -> &'static str {
        self.own.as_str()
    }

    fn name_for(&self, handle: &ExecHandle) -> &'static str {
        self.owner_of(handle).as_str()
    }

    fn name_of_job(&self, job: &Job) -> Result<&'static str, ExecError> {
        self.pick(job).map(|(k, _)| k.as_str())
    }

    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
        async move {
            let (kind, backend) = self.pick(job)?;
            let started = backend.start(job).await?;
            self.remember(&started.handle.name, kind);
            Ok(started)
        }
        .boxed()
    }

    fn output(&self, handle: &ExecHandle) -> OutputStream {
        self.backend_of(handle).output(handle)
    }

    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
        self.backend_of(handle).wait(handle)
    }

    fn kill<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        self.backend_of(handle).kill(handle)
    }

    fn terminate<'a>(
        &'a self,
        handle: &'a ExecHandle,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Termination, ExecError>> {
        self.backend_of(handle).terminate(handle, grace)
    }

    fn list<'a>(
        &'a self,
        agent: &'a AgentId,
    ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>> {
        async move {
            let mut all = Vec::new();
            for (kind, backend) in &self.backends {
                for found in backend.list(agent).await? {
                    self.remember(&found.handle.name, *kind);
                    all.push(found);
                }
            }
            Ok(all)
        }
        .boxed()
    }

    fn find<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
        async move {
            // A backend this agent does not allow holds nothing of it; the start says why.
            let Ok((kind, backend)) = self.pick(job) else {
                return Ok(None);
            };
            let found = backend.find(job).await?;
            if let Some(f) = &found {
                self.remember(&f.handle.name, kind);
            }
            Ok(found)
        }
        .boxed()
    }

    fn remove<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        async move {
            self.backend_of(handle).remove(handle).await?;
            self.owners().remove(&handle.name);
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::MockExecutor;
    use crate::process::ProcessExecutor;
    use drover_core::spec::RawSpec;

    fn job(root: &std::path::Path, executor: &str) -> Job {
        let spec = RawSpec {
            image: "none".into(),
            command: vec!["true".into()],
            executor: executor.into(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        crate::executor::test_job(root, spec)
    }

    #[tokio::test]
    async fn runs_on_the_named_backend_or_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let set = ExecutorSet::new(
            ExecutorName::Mock,
            Arc::new(MockExecutor::new(tmp.path())),
            BTreeMap::from([(
                ExecutorName::Process,
                Arc::new(ProcessExecutor::new(tmp.path())) as Arc<dyn Executor>,
            )]),
        );
        let own = job(tmp.path(), "");
        assert_eq!(set.name_of_job(&own).unwrap(), "mock");
        let started = set.start(&own).await.unwrap();
        assert_eq!(set.name_for(&started.handle), "mock");

        let process = job(tmp.path(), "process");
        let started = set.start(&process).await.unwrap();
        assert_eq!(set.name_for(&started.handle), "process");
        assert_eq!(set.wait(&started.handle).await.unwrap().code, Some(0));
        set.remove(&started.handle).await.unwrap();

        let docker = job(tmp.path(), "docker");
        match set.start(&docker).await {
            Err(ExecError::ExecutorUnavailable { requested, allowed }) => {
                assert_eq!(requested, "docker");
                assert_eq!(allowed, "process, mock");
            }
            other => panic!("expected executor_unavailable, got {other:?}"),
        }
        assert!(set.find(&docker).await.unwrap().is_none());
    }
}
