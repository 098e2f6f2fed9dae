"""bucketlens: classify images as they land in Google Cloud Storage.

gRPC's fork support can crash a child between ``fork`` and ``exec`` once a Pub/Sub client
exists (grpc/grpc#43055, grpcio >= 1.81: "epoll_wait ... Bad file descriptor"). PySpark
launches its JVM exactly that way, so a driver that provisioned or published first would
fail with ``JAVA_GATEWAY_EXITED``. bucketlens never uses gRPC in a forked child, so fork
support is off unless the user set it. This must run before grpc is imported.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
