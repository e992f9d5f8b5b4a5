from sdfleet.cli import main

raise SystemExit(main())
