"""The workflow authoring API. Import it as `kici` (`from kici import workflow, job, step, push`)."""
