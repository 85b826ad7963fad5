"""Revisions on a real etcd: every template change is kept as revisions/{ns}/{app}/{n},
`sigmactl rollout history` lists them, and deleting the app deletes them."""

from __future__ import annotations

import json

from tests.integration.conftest import Cluster, web_spec


def history(cluster: Cluster, app: str) -> list[int]:
    result = cluster.ctl("rollout", "history", app, "-o", "json")
    assert result.returncode == 0, result.stderr
    return [r["revision"] for r in json.loads(result.stdout)["revisions"]]


def test_template_changes_are_kept_as_revisions_and_go_with_the_app(cluster: Cluster) -> None:
    cluster.apply(web_spec(0, app="hist"))
    cluster.apply(web_spec(1, app="hist"))  # scaling makes no revision
    assert history(cluster, "hist") == [1]
    cluster.apply(web_spec(1, app="hist", restart="on-failure"))
    assert history(cluster, "hist") == [1, 3]
    table = cluster.ctl("rollout", "history", "hist")
    assert table.returncode == 0 and table.stdout.splitlines()[2].split()[0] == "*3", table
    undo = cluster.ctl("rollout", "undo", "hist")  # back to revision 1's spec: revision 4
    assert undo.returncode == 0 and "back one revision" in undo.stdout, undo
    assert history(cluster, "hist") == [1, 3, 4]
    status, app = cluster.api("GET", "/v1/apps/default/hist")
    assert status == 200 and app["spec"]["restart"] == "always" and app["replicas"] == 1
    bad = cluster.ctl("rollout", "undo", "hist", "--to", "2")
    assert bad.returncode == 1 and "to: 2 is not a kept revision" in bad.stderr, bad
    release = cluster.ctl("release", "hist", "--image", "busybox:not-pulled")
    assert release.returncode == 0 and history(cluster, "hist") == [1, 3, 4, 5], release
    assert cluster.ctl("delete", "app", "hist").returncode == 0
    missing = cluster.ctl("rollout", "history", "hist")
    assert missing.returncode == 1 and "default/hist" in missing.stderr
    cluster.apply(web_spec(0, app="hist"))
    assert history(cluster, "hist") == [1]
    assert cluster.ctl("delete", "app", "hist").returncode == 0
