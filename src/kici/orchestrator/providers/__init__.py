"""Where lock files and changed files come from: one provider per source kind.

- `git` (`providers.git`): any git repository, read with the `git` command at the exact commit.
- `github` (`providers.github`): a GitHub App, through the REST API with an installation token.

Every provider implements `LockFileSource`. They never run repository code: they read one file's bytes
at one commit and list changed paths.
"""

from kici.orchestrator.providers.base import LOCK_FILE_PATH, LockFileSource, ProviderError

__all__ = ["LOCK_FILE_PATH", "LockFileSource", "ProviderError"]
