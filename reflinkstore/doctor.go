package reflinkstore

import (
	"context"
	"fmt"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

var _ driver.Diagnoser = (*Store)(nil)

// Diagnose implements driver.Diagnoser: the store's filesystem, and for a sparse store file the
// host's space behind it.
func (s *Store) Diagnose(ctx context.Context) []driver.Finding {
	out := []driver.Finding{{Check: "store", Level: driver.LevelOK,
		Detail: fmt.Sprintf("%s on %s (%s), which reflinks", s.storeDir, s.fsType, s.mode)}}
	if s.mode == modeFile {
		free, _, serr := xfsutil.FreeSpace(s.storeDir)
		hfree, _, herr := xfsutil.FreeSpace(s.cfg.Root)
		switch {
		case serr != nil || herr != nil:
			out = append(out, driver.Finding{Check: "store file", Level: driver.LevelWarn, Detail: fmt.Sprintf("cannot read the free space: %v %v", serr, herr)})
		case hfree < free:
			out = append(out, driver.Finding{Check: "store file", Level: driver.LevelWarn,
				Detail: fmt.Sprintf("the sparse store file %s promises %s free, but the host filesystem under it has only %s: volumes fail with I/O errors once the host runs out", s.storeFile, driver.FormatSize(free), driver.FormatSize(hfree)),
				Action: "free space on the host filesystem, or give --root a filesystem that reflinks (XFS with reflink=1, or btrfs) so no store file is needed"})
		default:
			out = append(out, driver.Finding{Check: "store file", Level: driver.LevelOK,
				Detail: fmt.Sprintf("the sparse store file %s has %s free, and the host filesystem under it %s", s.storeFile, driver.FormatSize(free), driver.FormatSize(hfree))})
		}
	}
	if !s.cfg.Discard {
		out = append(out, driver.DiscardOff("in the store"))
	}
	return out
}
