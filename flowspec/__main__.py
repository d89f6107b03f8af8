from flowspec.cli import main

raise SystemExit(main())
