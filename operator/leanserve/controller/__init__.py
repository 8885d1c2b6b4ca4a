"""The operator's parts: builders (pure manifests), reconcile, the Kubernetes adapter, the profile cache, handlers."""
