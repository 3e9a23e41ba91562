"""Scale-out on Ray Serve: many render replicas behind one socket, routed by LoRA stack.

    stack_id  the stable id a request's LoRA stack is routed by (paths -> content digests + scales; the
              formula is client/http_render.py's, so a remote client computes the same id)
    board     a named Ray actor: per-replica status, stack loads, finished results by request key
    replica   the Serve deployment: one loaded model through the daemon's RenderRunner, multiplexed by stack
              (Serve's unload drops the stack from the replica's resident stacks: one LRU)
    ingress   the HTTP route on Serve's proxy (POST /easel/render, the Ray token checked, reply frames back)
    gateway   ClusterRunner: runner-shaped, forwards renders through a deployment handle (streams, retries)
    faults    Ray failures as one-line causes (no tracebacks in `replica_failed`)
    app       deploy / connect / shut down the application; a replica's BLAS threads
    cli       `easel gateway`, `easel cluster up|down`, the `cluster` renderer for `easel batch`

Only this room imports Ray (an import contract says so); nothing here is imported by the plain daemon.
"""
