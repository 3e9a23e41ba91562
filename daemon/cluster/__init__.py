"""Scale-out on Ray Serve: many render replicas behind one socket, routed by LoRA stack.

    stack_id  the stable id a request's LoRA stack is routed by (paths -> content digests + scales; pure)
    hop       what crosses the Ray hop: request in, events and the answer out (msgpack tuples; pure)
    board     a named Ray actor: per-replica status, stack loads, finished results by request key
    replica   the Serve deployment: one loaded model through the daemon's RenderRunner, multiplexed by stack
    gateway   ClusterRunner: runner-shaped, forwards renders through a deployment handle (streams, retries)
    app       deploy / connect / shut down the application
    cli       `easel serve --cluster`, `easel cluster up`, the `cluster` renderer for `easel batch`

Only this room imports Ray (an import contract says so); nothing here is imported by the plain daemon.
"""
