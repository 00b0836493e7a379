from hybrimoe.cli import main

raise SystemExit(main())
