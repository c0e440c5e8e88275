// Package main is the zgolden binary: `zgolden serve` runs the Docker volume plugin, and the other
// subcommands are the admin command line, a thin client of the running server's admin socket.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `zgolden: Docker volumes that are instant ZFS clones of a golden snapshot.

Usage:
  zgolden serve [flags]                                  run the volume plugin (see zgolden serve --help)
  zgolden status [--json]                                backend, space and volume counts
  zgolden golden ls [--json]                             goldens, generations and the volumes using them
  zgolden golden import DIR --project PRJ [--type T]     seed PRJ's next generation from a directory
  zgolden golden promote VOLUME --project PRJ            make a volume PRJ's next generation
  zgolden golden reclaim [PRJ] [--keep N]                destroy unused older generations
  zgolden golden rm PRJ                                  destroy a golden no volume depends on
  zgolden version

The admin commands talk to the running server over --admin-socket
(default /run/zgolden/admin.sock, or $ZGOLDEN_ADMIN_SOCKET).
`

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "zgolden:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return errors.New("no command given")
	}
	switch args[0] {
	case "serve":
		return serve(args[1:])
	case "status":
		return cmdStatus(args[1:])
	case "golden":
		if len(args) < 2 {
			fmt.Fprint(os.Stderr, usage)
			return errors.New("golden needs a subcommand: ls, import, promote, reclaim or rm")
		}
		switch args[1] {
		case "ls", "list":
			return cmdGoldenList(args[2:])
		case "import":
			return cmdGoldenImport(args[2:])
		case "promote":
			return cmdGoldenPromote(args[2:])
		case "reclaim":
			return cmdGoldenReclaim(args[2:])
		case "rm", "remove":
			return cmdGoldenRemove(args[2:])
		}
		return fmt.Errorf("unknown golden subcommand %q: use ls, import, promote, reclaim or rm", args[1])
	case "version", "--version":
		fmt.Println("zgolden", version)
		return nil
	case "help", "-h", "--help":
		fmt.Print(usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}
