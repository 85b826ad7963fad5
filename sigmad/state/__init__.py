"""The state cache (list + watch of etcd) and the one place that builds guarded writes."""
