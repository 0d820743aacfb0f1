from prxmail.cli import main

raise SystemExit(main())
