"""Starting jobs: the CLI, the local cluster and the roles its processes play."""
