package recordfile

import (
	"encoding/json"
	"sync"
)

// Lazy holds a record file opened at its first use and kept open, as both stores keep theirs: a
// store that never claims or removes never makes the file. The zero value is ready; safe for
// concurrent use.
type Lazy struct {
	mu sync.Mutex
	rf *File
}

// File returns the open record file, calling open first if there is none yet; an open that
// fails is tried again at the next call.
func (l *Lazy) File(open func() (*File, error)) (*File, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rf == nil {
		rf, err := open()
		if err != nil {
			return nil, err
		}
		l.rf = rf
	}
	return l.rf, nil
}

// Close closes the file if it is open; a later File opens it again.
func (l *Lazy) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rf == nil {
		return nil
	}
	err := l.rf.Close()
	l.rf = nil
	return err
}

// PutJSON writes v, encoded as JSON, as key's record.
func (rf *File) PutJSON(key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return rf.Put(key, data)
}
