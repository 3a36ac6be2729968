from .workloads import main

raise SystemExit(main())
