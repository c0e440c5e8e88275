package reflinkstore

import "path/filepath"

// StopSpareWorker stops s's spare worker and its record syncer without unmounting, syncing or
// deleting anything, as a kill -9 of the plugin would: tests that open a second store on the
// same root use it on the first.
func StopSpareWorker(s *Store) {
	s.stopSpares()
	s.abandonRecords()
}

// StopSpares stops s's spare worker alone, leaving its spares as they are until a new store
// opens on the root.
func StopSpares(s *Store) { s.stopSpares() }

// FileID is fileID, for tests that write records as a crash would have left them.
func FileID(path string) (string, error) { return fileID(path) }

// RecordFile is the record file of the store at root.
func RecordFile(root string) string { return filepath.Join(root, recordsName) }
