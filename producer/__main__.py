"""``python -m producer``: the same parser and behaviour as ``bucketlens produce``."""

from producer.cli import main

raise SystemExit(main())
