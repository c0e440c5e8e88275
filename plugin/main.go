// Package main is the zgolden binary: `zgolden serve` runs the Docker volume plugin, and the other
// subcommands are the admin command line, a thin client of the running server's admin socket.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// commands is every subcommand with its arguments and flags, in the order usage lists them. The
// subcommands' own --help reads its line from here, and TestUsageListsEveryFlag holds each line
// to the flags its subcommand defines.
var commands = []struct{ path, args, summary string }{
	{"serve", "[flags]", "run the volume plugin (see zgolden serve --help)"},
	{"status", "[--json]", "backend, space, spares, sync times and volume counts"},
	{"golden ls", "[--json]", "goldens, generations and the volumes using them"},
	{"golden import", "DIR --project PRJ [--type block|fs] [--remove-source] [--json]", "seed PRJ's next generation from a directory"},
	{"golden promote", "VOLUME --project PRJ [--json]", "make a volume PRJ's next generation"},
	{"golden reclaim", "[PRJ] [--keep N] [--json]", "destroy unused older generations"},
	{"golden rm", "PRJ [--force] [--json]", "destroy a golden no volume uses (--force: and its volumes, none mounted)"},
	{"golden export", "PRJ [--generation N] [--since M] [--resume TOKEN] [--json] > FILE", "write a generation as a stream; --since M (ZFS): only what changed since M; --resume (ZFS): the rest of a receiver's partial receive"},
	{"golden receive", "PRJ [--json] < FILE", "add the generation a stream carries to PRJ, once it is complete and checked"},
	{"golden push", "PRJ [USER@]HOST [--ssh-port N] [--identity FILE] [--known-hosts FILE] [--remote-zgolden CMD] [--remote-admin-socket PATH] [--json]", "send HOST over SSH what it lacks of PRJ's newest generation"},
	{"golden pull", "PRJ [USER@]HOST [--ssh-port N] [--identity FILE] [--known-hosts FILE] [--remote-zgolden CMD] [--remote-admin-socket PATH] [--json]", "fetch over SSH what this host lacks of PRJ's newest generation on HOST"},
	{"doctor", "[--json]", "check the pool or store and the settings; exits 1 when something needs action"},
	{"volume reap", "[--after DURATION] [--dry-run] [--json]", "remove volumes no container has referenced for DURATION (default --reap-unused-after)"},
	{"version", "", "print the version"},
}

// synopsis is "PATH ARGS" of the subcommand path, as its usage line shows it.
func synopsis(path string) string {
	for _, c := range commands {
		if c.path == path {
			return strings.TrimSpace(c.path + " " + c.args)
		}
	}
	return path
}

// usage lists the subcommands under prefix ("" for all of them, "golden" for the golden ones).
func usage(prefix string) string {
	var b strings.Builder
	b.WriteString("zgolden: Docker volumes that are instant ZFS clones of a golden snapshot.\n\nUsage:\n")
	for _, c := range commands {
		if prefix == "" || strings.HasPrefix(c.path, prefix+" ") {
			fmt.Fprintf(&b, "  zgolden %s\n        %s\n", synopsis(c.path), c.summary)
		}
	}
	b.WriteString("\nzgolden COMMAND --help shows a command's flags. The admin commands talk to the running\n" +
		"server over --admin-socket (default /run/zgolden/admin.sock, or $ZGOLDEN_ADMIN_SOCKET).\n")
	return b.String()
}

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
		fmt.Fprint(os.Stderr, usage(""))
		return errors.New("no command given")
	}
	switch args[0] {
	case "serve":
		return serve(args[1:])
	case "status":
		return cmdStatus(args[1:])
	case "doctor":
		return cmdDoctor(args[1:])
	case "golden":
		if len(args) < 2 {
			fmt.Fprint(os.Stderr, usage("golden"))
			return errors.New("golden needs a subcommand: ls, import, promote, reclaim, rm, export, receive, push or pull")
		}
		switch args[1] {
		case "help", "-h", "--help":
			fmt.Print(usage("golden"))
			return nil
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
		case "export":
			return cmdGoldenExport(args[2:])
		case "receive":
			return cmdGoldenReceive(args[2:])
		case "push":
			return cmdGoldenPush(args[2:])
		case "pull":
			return cmdGoldenPull(args[2:])
		}
		return fmt.Errorf("unknown golden subcommand %q: use ls, import, promote, reclaim, rm, export, receive, push or pull", args[1])
	case "volume":
		if len(args) < 2 || args[1] == "help" || args[1] == "-h" || args[1] == "--help" {
			fmt.Print(usage("volume"))
			if len(args) < 2 {
				return errors.New("volume needs a subcommand: reap")
			}
			return nil
		}
		if args[1] == "reap" {
			return cmdVolumeReap(args[2:])
		}
		return fmt.Errorf("unknown volume subcommand %q: use reap", args[1])
	case "version", "--version":
		fmt.Println("zgolden", version)
		return nil
	case "help", "-h", "--help":
		fmt.Print(usage(""))
		return nil
	}
	fmt.Fprint(os.Stderr, usage(""))
	return fmt.Errorf("unknown command %q", args[0])
}
