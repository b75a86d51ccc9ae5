"""The search service on a Ray cluster (issue 21, docs/SCALING.md, DESIGN.md 8).

Past one machine the segments of a repository are split among shard actors by segment id
(assignment.py); each loads its own segments from the bucket and answers exact top-k for
its rows with the single-machine engine (shard.py). A front service (cloud/service.py
with ``--ray-address``) authenticates once, fans the query out, merges by score and
answers with the union of the segment sets the shards searched (front.py, merge.py), so
the client's completeness check (docs/FORMAT-2.md 6) holds across the cluster. A shard
that does not answer in time is a 503 naming it, never a partial answer. Keyword and
combined queries (issue 17) run the single service's keyword code on each shard's segments
(cloud/keyword_views.py) and merge to its answer. Nonces and rate limits live in one guard
actor shared by every front replica (guard.py); /readyz and /metrics of a front say which
shards are ready and what each holds (health.py). Shards join and leave a running
cluster (resize.py, ``ClusterFront.resize``, ``radcrypt serve --resize``): the next layout
is staged beside the one serving and switched to when every shard of it has loaded.

Ray is an optional extra (radcrypt[cluster]): nothing here imports it at module level
except front.py's functions, which import it when a cluster is used.
"""
